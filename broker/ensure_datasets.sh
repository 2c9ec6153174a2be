#!/usr/bin/env bash
# Make sure Fashion-MNIST is where Debian's dataset-fashion-mnist puts it
# (/usr/share/datasets/fashion-mnist, the four upstream IDX files); install it when we are root.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Fashion-MNIST (apt-get install -y dataset-fashion-mnist)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
  exit 0
fi
echo "Fashion-MNIST is not installed in $DIR: sudo apt-get install dataset-fashion-mnist" \
     "(or give --data-path DIR with the upstream IDX files)" >&2
exit 1
