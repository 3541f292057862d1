#!/usr/bin/env bash
# System packages the test suite needs (Debian): Chromium for the DrawBench report browser test.
# Skipped quietly where it is already there; needs root (CI and dev machines run as root).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  echo "install_system_deps: chromium missing and not root; run: sudo apt-get install -y chromium" >&2
  exit 0
fi
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
