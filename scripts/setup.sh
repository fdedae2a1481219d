#!/usr/bin/env bash
# Create (or reuse) .venv and install the project. Usage: scripts/setup.sh [test]   (test: with the test extras)
# Skips `pip install` when pyproject.toml, the Python version and the extras are what the last install had (a stamp
# in .venv/); a fresh checkout (no .venv) always installs. FORCE_SETUP=1 installs anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
log=.venv/setup.log
spec="."
[ "${1:-}" = "test" ] && spec=".[test]"
key="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $(python -c 'import sys; print(sys.version.split()[0])')"
stamp=.venv/setup-stamp
# an install with the test extras also covers a plain one
if [ -z "${FORCE_SETUP:-}" ] && [ -f "$stamp" ] && { grep -qxF "$key $spec" "$stamp" || grep -qxF "$key .[test]" "$stamp"; } \
   && python -c "import deepseek_vl_jax" 2>/dev/null; then
  exit 0
fi
echo "setting up .venv (pip install -e '$spec'; log: $log)" >&2
if ! { python -m pip install -q --upgrade pip && python -m pip install -q -e "$spec"; } > "$log" 2>&1; then
  cat "$log" >&2
  echo "setup failed; see $log" >&2
  exit 1
fi
{ grep -vF "$key" "$stamp" 2>/dev/null || true; echo "$key $spec"; } > "$stamp.new" && mv "$stamp.new" "$stamp"
