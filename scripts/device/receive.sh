#!/usr/bin/env bash
# Runs ON the device machine: copies one carried part (.pN, made by scripts/device/gather.sh) to /tmp/w.
# /tmp survives between calls while the machine stays warm (30 s after a call), so issue the part calls
# back to back. The last call adds `install`: bash scripts/device/receive.sh .p8 install
set -euo pipefail
cd "$(dirname "$0")/../.."
part=${1:?usage: receive.sh .pN [install]}
mkdir -p /tmp/w
cp -r "$part"/. /tmp/w/
echo "received $part: $(ls "$part" | wc -l) files; /tmp/w now $(du -sh /tmp/w | cut -f1)"
if [ "${2:-}" = install ]; then
  exec bash scripts/device/run_checks.sh install
fi
