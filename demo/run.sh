#!/usr/bin/env bash
# Shows what the vfio.dra.dev kubelet plugin sees on the demo node (a
# two-socket server laid out in demo/sysfs exactly as Linux lays out /sys)
# and the ResourceSlices it publishes for it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
args=(--sysfs-root demo/sysfs --node-name demo-node --config demo/config.yaml)

echo "== PCI functions of the demo node and the driver's decision"
echo "\$ vfio-dra inspect ${args[*]}"
"$BIN/vfio-dra" inspect "${args[@]}"
echo
echo "== The ResourceSlices the plugin publishes (accepted by kubectl create -f -)"
echo "\$ vfio-dra inspect ${args[*]} -o yaml"
"$BIN/vfio-dra" inspect "${args[@]}" -o yaml
