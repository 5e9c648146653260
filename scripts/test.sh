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

# a system Python of the suite's version: the interpreter tests/test_worker_user.py runs users' workers with as
# `nobody` (the suite's own may live where that user cannot enter, as under /root)
PYVER=$("$VPY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ ! -x "/usr/bin/python$PYVER" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq "python$PYVER" || echo "note: no python$PYVER from apt"
fi

# the browser of the dashboard tests (tests/test_dashboard.py): Debian's chromium, driven by Playwright
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash scripts/install-browser.sh
fi

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
