#!/usr/bin/env bash
# Install what is needed, then describe and detect on an example photo.
# Uses $PALIGEMMA_MODEL (a folder or repo id) when set, else the real mix checkpoint when it is
# in the Hugging Face cache, else the built-in demo checkpoint (random weights, no download).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
model=${PALIGEMMA_MODEL:-}
if [ -z "$model" ]; then
  if HF_HUB_OFFLINE=1 .venv/bin/python -c "from huggingface_hub import snapshot_download as s; s('google/paligemma2-3b-mix-224', local_files_only=True)" 2>/dev/null; then
    model=google/paligemma2-3b-mix-224
  else
    model=demo
  fi
fi
image=examples/images/astronaut.jpg
.venv/bin/paligemma describe "$image" --model "$model" --max-tokens 32
.venv/bin/paligemma detect "$image" "person ; flag" --model "$model" --max-tokens 16 --save /tmp/paligemma-detect.jpg
