#!/usr/bin/env bash
# The image's start command: serve every checkpoint folder found in $DYNABERT_MODELS_DIR (the /models
# volume), i.e. the folder itself if it holds dynabert.json, else each subfolder that does
# (e.g. /models/sst2 and /models/squad, served side by side and addressed by name).
# Extra arguments are passed to `dynabert serve` (e.g. --workers 2).
# Never trains or downloads: with no checkpoint mounted it stops with a message saying what to mount.
set -euo pipefail

models_dir="${DYNABERT_MODELS_DIR:-/models}"
host="${DYNABERT_HOST:-0.0.0.0}"
port="${DYNABERT_PORT:-8000}"

checkpoints=()
if [ -f "$models_dir/dynabert.json" ]; then
  checkpoints+=(--checkpoint "$models_dir")
else
  for dir in "$models_dir"/*/; do
    if [ -f "${dir}dynabert.json" ]; then checkpoints+=(--checkpoint "${dir%/}"); fi
  done
fi

if [ "${#checkpoints[@]}" -eq 0 ]; then
  echo "dynabert: no checkpoint in $models_dir (a folder holding dynabert.json)." >&2
  echo "  Mount one, e.g. docker run -v \"\$PWD/models/sst2:/models/sst2:ro\" ...;" >&2
  echo "  build it first with 'dynabert train --task sst2 --recipe quick' (or 'make serve') on the host." >&2
  exit 66
fi

exec dynabert serve "${checkpoints[@]}" --host "$host" --port "$port" "$@"
