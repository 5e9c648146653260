#!/usr/bin/env bash
# The browser tests/test_dashboard.py drives through Playwright: Debian's chromium at /usr/bin/chromium
# (never `playwright install`: no browser downloads from outside the distribution).
# Run as root where chromium is missing; where it is installed already, this does nothing.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium: /usr/bin/chromium is installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is missing: run this script as root (sudo $0), or: apt-get install -y chromium" >&2
  exit 1
fi
apt-get update
apt-get install -y chromium
