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
# Usage: scripts/check-vllm.sh [VENV [PIP_REQUIREMENT...]]
#        defaults: /tmp/vllm-check-venv and "vllm" (the newest, installed once). An older release
#        needs the transformers it was made for, e.g.:
#        scripts/check-vllm.sh /tmp/vllm-0.9 "vllm==0.9.2" "transformers<4.54"
#
# Passed on (Python 3.11, CPU only, 2026-12-03): vllm 0.33.0 (`--runner pooling` style) and
# vllm 0.9.2 (`--task` style, the oldest release ragserve[vllm] allows is 0.8).
set -euo pipefail

venv=${1:-/tmp/vllm-check-venv}
shift || true
requirements=("$@")
root=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ${#requirements[@]} -gt 0 ] || ! "$venv/bin/python" -m pip show vllm >/dev/null 2>&1; then
    [ ${#requirements[@]} -gt 0 ] || requirements=(vllm)
    "$venv/bin/python" -m pip install --upgrade pip
    "$venv/bin/python" -m pip install "${requirements[@]}"
fi
# ragserve from this checkout (its engine module needs only the standard library and httpx,
# which vllm brings); vLLM's own start-up log goes to stderr.
VLLM_TARGET_DEVICE=cpu PYTHONPATH="$root/src" "$venv/bin/python" "$root/scripts/check_vllm_args.py"
