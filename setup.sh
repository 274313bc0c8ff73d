#!/usr/bin/env bash
# One-time setup on a fresh Debian/Ubuntu machine: the ZBar library for pyzbar, CPU torch, the package + test extras.
set -euo pipefail
cd "$(dirname "$0")"
if ! python3 -c "import ctypes.util, sys; sys.exit(0 if ctypes.util.find_library('zbar') else 1)"; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libzbar0
fi
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
