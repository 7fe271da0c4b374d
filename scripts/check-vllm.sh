#!/usr/bin/env bash
# Check the `vllm serve` argument lists ragserve builds against the real vLLM's own argument parser.
#
# Not in CI: it installs the real vllm wheel (about 7 GB with its CUDA torch; 5-15 minutes) into a
# venv of its own. No GPU is needed: VLLM_TARGET_DEVICE=cpu lets vLLM build its parser on any
# machine. scripts/check_vllm_args.py takes the exact lists the vLLM engine runs for representative
# specs (thinking chat model with reasoning parser, AWQ, Qwen3-Embedding, a native embedding model,
# Qwen3-Reranker, a cross-encoder; context length, GPU memory share, tensor parallel, dtype...) and
# fails when vLLM rejects a flag or a value we send does not reach vLLM's engine or frontend args.
#
# Usage: scripts/check-vllm.sh [VENV] [PIP_REQUIREMENT]
#        defaults: /tmp/vllm-check-venv and "vllm" (the newest); e.g. "vllm==0.9.2" for an older one.
#
# Passed on (Python 3.11, CPU only): vllm 0.33.0 (2026-12-03).
set -euo pipefail

venv=${1:-/tmp/vllm-check-venv}
requirement=${2:-vllm}
root=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -m pip show vllm >/dev/null 2>&1 || [ "$requirement" != vllm ]; then
    "$venv/bin/python" -m pip install --upgrade pip
    "$venv/bin/python" -m pip install "$requirement"
fi
# ragserve from this checkout (its engine module needs only the standard library and httpx,
# which vllm brings); vLLM's own start-up log goes to stderr.
VLLM_TARGET_DEVICE=cpu PYTHONPATH="$root/src" "$venv/bin/python" "$root/scripts/check_vllm_args.py"
