#!/usr/bin/env bash
# Make sure a headless-capable Chromium exists: the dashboard test (tests/test_dashboard.py)
# drives Debian's `chromium` over its DevTools pipe. Install it from Debian packages when we
# are root; quick (no apt call) when it is already there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
   || command -v google-chrome >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the dashboard test (apt-get install -y chromium)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
  exit 0
fi
echo "chromium is not installed (tests/test_dashboard.py needs it): sudo apt-get install chromium" >&2
exit 1
