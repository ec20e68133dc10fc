#!/usr/bin/env bash
# cluster/join-mac.sh HEAD_IP[:PORT] [more `ray start` flags]
#
# Join this Apple-silicon Mac to a running kolm-ray cluster as a `mac` node: it advertises the custom
# resource mps=1 and the labels kolm.io/node-kind=mac, kolm.io/device=mps (cluster/node-kinds.yaml).
# kolm-ray puts Serve replicas (the tagger runs on mps, then cpu) and Ray Data actors here, and never
# compile workers: there is no CUDA on a Mac, so no DeepSpeed (placement.py selects kolm.io/node-kind!=mac).
#
# What Ray supports on macOS today (see cluster/README.md): Ray installs and runs on Apple silicon, but
# multi-node clusters are supported on Linux only; a Mac joins "at your own risk" with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (set below). Ray does not detect the Apple GPU, hence the custom
# `mps` resource. Use the same Python and Ray versions as the head.
set -euo pipefail

HEAD="${1:?usage: cluster/join-mac.sh HEAD_IP[:6379] [ray start flags]}"
shift
[[ "$HEAD" == *:* ]] || HEAD="$HEAD:6379"

if [[ "$(uname -s)" != "Darwin" ]]; then
  echo "error: join-mac.sh is for macOS; use cluster/join-cpu.sh on Linux" >&2
  exit 2
fi
[[ "$(uname -m)" == "arm64" ]] || echo "warning: not Apple silicon; torch has no mps here, replicas run on cpu" >&2

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python3)}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"       # same mode as the head; the token in ~/.ray/auth_token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1           # Ray's opt-in for a macOS node in a multi-node cluster
export PYTORCH_ENABLE_MPS_FALLBACK=1                 # ops mps lacks run on cpu instead of raising
# A Mac often has Wi-Fi and Ethernet: pass --node-ip-address=<the address the head can reach> if Ray picks
# the wrong one (the head must be able to connect back to this machine).

exec "$PYTHON" "$HERE/kolm_node.py" mac --address "$HEAD" -- "$@"
