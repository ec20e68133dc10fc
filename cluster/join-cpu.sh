#!/usr/bin/env bash
# cluster/join-cpu.sh HEAD_IP[:PORT] [more `ray start` flags]
#
# Join this Linux CPU server to a running kolm-ray cluster as a `cpu` node: it advertises the custom
# resource kolm_cpu_node=1 and the label kolm.io/node-kind=cpu (cluster/node-kinds.yaml), and takes
# Ray Data featurisation, CPU Serve replicas and, when the cluster has no GPU, CPU (DDP) compiles.
#
# Before running it: the same Python and Ray versions as the head (`ray --version`), kolm-ray installed
# (`pip install -e .` from this repo, or let jobs ship it with runtime_env), and the head's token:
#   ssh HEAD ray get-auth-token > ~/.ray/auth_token && chmod 600 ~/.ray/auth_token
# Token auth is on by default here (RAY_AUTH_MODE=token); every node of a cluster must use the same mode.
set -euo pipefail

HEAD="${1:?usage: cluster/join-cpu.sh HEAD_IP[:6379] [ray start flags]}"
shift
[[ "$HEAD" == *:* ]] || HEAD="$HEAD:6379"  # 6379: Ray's default GCS port

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python3)}"  # the Python Ray is installed in (a venv's, if you use one)
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

exec "$PYTHON" "$HERE/kolm_node.py" cpu --address "$HEAD" -- "$@"
