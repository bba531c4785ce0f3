# r21d -- the README's two commands, `make test` and `make bench`, do ALL set-up on a fresh
# machine: a .venv with torch 2.14.1 + torchvision 0.29.1 and the test/bench tools, then r21d
# installed editable with its CUDA extension r21d._C built by nvcc (pure Python where nvcc or a
# CUDA build of torch is missing). Edits to setup.py, pyproject.toml or csrc/ rebuild it.
# Overrides: PYTHON=python3.11 (creates the venv), MAX_JOBS=N, TORCH_CUDA_ARCH_LIST=...,
# ARGS='...' (passed to r21d-bench / r21d.static).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS   := torch==2.14.1 torchvision==0.29.1 numpy 'setuptools>=64' wheel ninja build \
          pytest hypothesis expecttest matplotlib pytest-benchmark
CSRC   := $(shell find csrc 2>/dev/null)
# the package roots: an editable install made before their __init__.py existed must be redone
ROOTS  := $(wildcard r21d/__init__.py triton_kernels/__init__.py)

.PHONY: test bench static install clean gpu-check

test: $(VENV)/.r21d-installed
	$(PY) -m pytest -q

bench: $(VENV)/.r21d-installed
	$(VENV)/bin/r21d-bench $(ARGS)

static: $(VENV)/.r21d-installed
	$(PY) -m r21d.static $(ARGS)

install: $(VENV)/.r21d-installed

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.r21d-deps: Makefile | $(PY)
	$(PIP) install -q --progress-bar off $(DEPS)
	touch $@

$(VENV)/.r21d-installed: $(VENV)/.r21d-deps setup.py pyproject.toml MANIFEST.in $(CSRC) $(ROOTS)
	$(PIP) install --no-build-isolation -e '.[test,bench]'
	touch $@

# make gpu-check OUT=dir: on a GPU machine, no network and no venv needed: builds r21d._C when
# missing or stale (pip install --no-build-isolation --no-deps -e ., MAX_JOBS = cores), then
# checks and times everything in at most 8 minutes, build included, into dir/gpu-check.json
# (rewritten after every check) and .png. Without a GPU it checks its own wiring and exits 0.
# Interpreter: PYTHON when given, else .venv's when there is one, else python3. ARGS='--dry-run',
# '--with-compile', '--stages accuracy-bf16,speed' are passed on.
OUT ?= gpu-check-out
GPU_CHECK_PY := $(if $(filter file,$(origin PYTHON)),$(if $(wildcard $(PY)),$(PY),$(PYTHON)),$(PYTHON))

gpu-check:
	@start=$$(date +%s); \
	$(GPU_CHECK_PY) r21d/bench/gpu_check/bootstrap.py '$(OUT)' && \
	$(GPU_CHECK_PY) -m r21d.bench.gpu_check --out '$(OUT)' --started-at $$start $(ARGS)

clean:
	rm -rf build dist *.egg-info r21d/_C*.so $(VENV)/.r21d-installed .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
