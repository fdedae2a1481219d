#!/usr/bin/env bash
# Set up (.venv with the test extras: torch 2.13.0 CPU and transformers 5.23.0 as the reference) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
# Two workers (pytest-xdist), a test file to each: a session is mostly single-threaded compiles and Python, and
# every module-scoped fixture stays in one process. PYTEST_WORKERS=0: one process.
exec python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
