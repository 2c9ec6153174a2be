#!/usr/bin/env bash
# Make sure a mosquitto binary exists; install it from Debian packages when we are root.
set -euo pipefail
if { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } && command -v mosquitto_pub >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing mosquitto (apt-get install -y mosquitto mosquitto-clients)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  exit 0
fi
echo "mosquitto is not installed; install mosquitto: sudo apt-get install mosquitto mosquitto-clients" >&2
exit 1
