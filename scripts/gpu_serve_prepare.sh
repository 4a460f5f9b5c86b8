#!/usr/bin/env bash
# Prepares here what scripts/gpu_serve_session.sh reads on a lent GPU machine (both folders are
# git-ignored: name them in the device tool's `carry`):
#   .whl/  wheels, for the machine's Python 3.12 on x86-64, of the server packages its image
#          lacks, at the versions this checkout's .venv runs;
#   .gpu/  the served checkpoint with its weights in fp16 (the tool carries at most 64 MiB, and
#          MiniLM-L6's fp32 weights are 91 MB; restored to fp32 there), the MiniLM tokenizer files
#          (the test fixtures' tokenizer) and SST-2's dev sentences (the bench's load).
# Usage: bash scripts/gpu_serve_prepare.sh [CHECKPOINT_DIR]   (default models/sst2-minilm-l6)
set -euo pipefail
CKPT=${1:-models/sst2-minilm-l6}
PY=${PY:-.venv/bin/python}
DATA=${DYNABERT_DATA_DIR:-../shared/data}
[ -f "$CKPT/dynabert.json" ] || { echo "no checkpoint at $CKPT (make serve builds the default)"; exit 1; }

# the server packages missing from the GPU image (its list: /work/.library/device/KINDS.md)
PKGS="fastapi starlette uvicorn httptools pydantic pydantic_core pydantic-settings python-dotenv
      annotated-types typing-inspection typing_extensions opentelemetry-api"
pins=()
for p in $PKGS; do
  v=$($PY -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "$p is not installed in $PY's environment"; exit 1; }
  pins+=("$p==$v")
done
rm -rf .whl && mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"

rm -rf .gpu && mkdir -p .gpu/sst2-minilm-l6 .gpu/tok .gpu/data/SST-2
for f in dynabert.json eval.json tokenizer.json tokenizer_config.json; do
  [ -f "$CKPT/$f" ] && cp "$CKPT/$f" .gpu/sst2-minilm-l6/
done
$PY - "$CKPT" <<'EOF'
import sys
from safetensors import safe_open
from safetensors.torch import save_file
with safe_open(f"{sys.argv[1]}/model.safetensors", framework="pt") as f:
    meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
err = max(float((v - v.half().float()).abs().max() / (v.abs().max() + 1e-12)) for v in sd.values())
save_file({k: v.half() for k, v in sd.items()}, ".gpu/sst2-minilm-l6/model.fp16.safetensors", metadata=meta)
print(f"fp16 weights: largest rounding error {err:.1e} of a tensor's largest value")
EOF
tok=$($PY -c "from model.hf import backbone_dir; print(backbone_dir('minilm-l6'))")
for f in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt config.json; do
  cp "$tok/$f" .gpu/tok/
done
cp "$DATA/SST-2/dev.tsv" .gpu/data/SST-2/
du -sh .whl .gpu
echo "carry: [\".gpu\", \".whl\"]; run: OUT=\$OUT bash scripts/gpu_serve_session.sh"
