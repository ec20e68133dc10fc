#!/usr/bin/env bash
# benchmarks/gpu.py on a GPU machine: install the wheels carried in .whl/ (benchmarks/gpu_wheels.sh builds
# them: DeepSpeed without ops, its pure-Python needs, Liger Kernel) into a side directory, then run the
# script. Arguments go to gpu.py. With $OUT set (the lent machine's folder that comes back), the JSON and
# the log are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
SITE=${KOLM_WHEEL_SITE:-/tmp/kolm-site}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export KOLM_HOME=${KOLM_HOME:-/tmp/kolm-home} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/kolm-torch-ext}
LOG=$(mktemp -t kolm-gpu-XXXX.log)
set +e
"$PY" benchmarks/gpu.py "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
if [ -n "${OUT:-}" ]; then
  cp "$LOG" "$OUT/gpu.log"
  [ -f benchmarks/results/gpu.json ] && cp benchmarks/results/gpu.json "$OUT/gpu.json"
fi
exit "$rc"
