#!/usr/bin/env bash
# Wheels benchmarks/gpu.sh installs on a GPU machine that has PyTorch, Transformers, PEFT and Triton but no
# DeepSpeed (an sdist: built here without its ops, which compile on first use there if ever needed), nor
# DeepSpeed's pure-Python needs that the machine lacks (hjson, pydantic), nor Liger Kernel. Versions are
# this venv's, for CPython 3.12 on x86-64. Writes .whl/ (git-ignored; carried by the device run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q "deepspeed==$(version deepspeed)" --no-deps -w .whl
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLAT+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
  "liger-kernel==${LIGER_VERSION:-0.8.5}"
ls -la .whl
du -sh .whl
