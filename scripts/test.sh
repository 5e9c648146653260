#!/usr/bin/env bash
# Install everything the tests need into .venv and run the whole suite.
# This is the README's test command, and exactly what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet -e '.[test]'

# Node.js clients for the cross-language test (npm registry; versions pinned in package-lock.json)
if command -v npm >/dev/null 2>&1; then
  (cd tests/node && npm ci --silent --no-audit --no-fund)
fi

# lint and types first: seconds, and a finding fails the run before the long part
.venv/bin/ruff check .
.venv/bin/mypy

# the whole suite against real nats-server processes
"$VPY" -m pytest -q "$@"

# the Cython tests again, built with AddressSanitizer + UBSan
PYTHON="$VPY" bash tests/sanitize.sh
