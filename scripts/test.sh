#!/usr/bin/env bash
# Set up (.venv with the test extras: torch 2.13.0 CPU and transformers 5.23.0 as the reference) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
