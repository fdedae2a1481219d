#!/usr/bin/env bash
# Create (or reuse) .venv and install the project. Usage: scripts/setup.sh [test]   (test: with the test extras)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
log=.venv/setup.log
spec="."
[ "${1:-}" = "test" ] && spec=".[test]"
echo "setting up .venv (pip install -e '$spec'; log: $log)" >&2
if ! { python -m pip install -q --upgrade pip && python -m pip install -q -e "$spec"; } > "$log" 2>&1; then
  cat "$log" >&2
  echo "setup failed; see $log" >&2
  exit 1
fi
