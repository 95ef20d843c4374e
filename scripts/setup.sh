#!/usr/bin/env bash
# Create .venv and install the package with what the tests and both backends need.
# Usage: scripts/setup.sh   (idempotent; a second run only checks that everything is there)
# pip's output goes to .venv/setup.log, shown only when something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=.venv/setup.log
: > "$log"
pip() {
  if ! .venv/bin/python -m pip "$@" >> "$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "error: pip $* failed (full log: $log)" >&2
    exit 1
  fi
}
echo "setting up .venv (log: $log) ..." >&2
pip install --upgrade pip
extras="test,test-serve,serve,torch,segment,finetune,parquet,ray,video"
case "$(uname -s)-$(uname -m)" in
  Darwin-arm64) ;;                    # plain mlx comes with the package on Apple silicon
  Linux-*) extras="$extras,mlx-cpu"   # mlx's CPU build for Linux
           # torch 2.13.0: the CPU build where a local wheel is provided; pinning it keeps pip from
           # choosing a newer multi-GB CUDA build
           pip install "torch==2.13.0" ;;
esac
pip install -e ".[$extras]"
# tests/test_page.py drives a real browser: Debian's chromium through chromedriver (selenium)
if [ "$(uname -s)" = Linux ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (apt-get) ..." >&2
    lock() { if command -v flock >/dev/null; then flock /tmp/apt.lock "$@"; else "$@"; fi; }
    if ! { lock apt-get update && lock apt-get install -y --no-install-recommends chromium chromium-driver; } >> "$log" 2>&1; then
      tail -n 30 "$log" >&2
      echo "error: apt-get install chromium chromium-driver failed (full log: $log)" >&2
      exit 1
    fi
  else
    echo "note: tests/test_page.py needs chromium and chromedriver: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
