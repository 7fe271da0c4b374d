#!/usr/bin/env bash
# Set up (scripts/setup.sh), then serve the built-in small models and check them end to end:
# chat, retrieval on a small knowledge base, rerank on vs off, and an answer from the retrieved passage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${RAGSERVE_VENV:-.venv}
export RAGSERVE_HOME=${RAGSERVE_HOME:-$PWD/.demo-home}
export HF_HUB_OFFLINE=1
RAGSERVE="$VENV/bin/ragserve"

"$RAGSERVE" up -f demo
"$RAGSERVE" check
echo
echo "The demo stack is still running (home: $RAGSERVE_HOME)."
echo "Try:  $RAGSERVE list        Stop it:  $RAGSERVE down -f demo"
