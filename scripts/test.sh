#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${RAGSERVE_VENV:-.venv}
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q "$@"
