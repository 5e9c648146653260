#!/usr/bin/env bash
# System packages the benchmarks run as peers (Debian/Ubuntu), plus the bench extra.
#   Redis: bench/mem.py starts its own redis-server on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v redis-server >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -m pip install --quiet -e '.[bench]'
