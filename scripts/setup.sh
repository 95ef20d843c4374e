#!/usr/bin/env bash
# Create .venv and install the package with what the tests and both backends need.
# Usage: scripts/setup.sh   (idempotent; a second run only checks that everything is there)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras="test,torch"
case "$(uname -s)-$(uname -m)" in
  Darwin-arm64) ;;                    # plain mlx comes with the package on Apple silicon
  Linux-*) extras="$extras,mlx-cpu"   # mlx's CPU build for Linux
           # torch 2.13.0: the CPU build where a local wheel is provided; pinning it keeps pip from
           # choosing a newer multi-GB CUDA build
           .venv/bin/python -m pip install -q "torch==2.13.0" ;;
esac
.venv/bin/python -m pip install -q -e ".[$extras]"
