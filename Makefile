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
          pytest hypothesis expecttest matplotlib pytest-benchmark ruff clang-format==23.1.5
ZOO_DEPS := pytorchvideo==0.1.5 fvcore iopath portalocker yacs pyyaml tabulate termcolor tqdm
CSRC   := $(shell find csrc 2>/dev/null)
# the package roots: an editable install made before their __init__.py existed must be redone
ROOTS  := $(wildcard r21d/__init__.py triton_kernels/__init__.py)

.PHONY: test bench static install clean test-oldest gpu-check lint

test: $(VENV)/.r21d-installed
	$(PY) -m pytest -q --durations=30

# ruff (pyflakes, isort, bugbear, pyupgrade; configured in pyproject.toml), then clang-format over
# the C++ / CUDA sources (style in .clang-format; fix with `.venv/bin/clang-format -i FILE`)
lint: $(VENV)/.r21d-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc tests/csrc -type f \( -name '*.h' -o -name '*.cuh' \
	  -o -name '*.hpp' -o -name '*.cpp' -o -name '*.cc' -o -name '*.cu' \) | sort)

bench: $(VENV)/.r21d-installed
	$(VENV)/bin/r21d-bench $(ARGS)

static: $(VENV)/.r21d-installed
	$(PY) -m r21d.static $(ARGS)

install: $(VENV)/.r21d-installed

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.r21d-deps: Makefile | $(PY)
	$(PIP) install -q --progress-bar off $(DEPS)
	@# pytorchvideo's model zoo for the fuse tests (tests/nn/test_fuse_traced.py), without its video
	@# I/O dependencies (av); from the package index: where it is unreachable those tests skip
	-$(PIP) install -q --progress-bar off --no-deps $(ZOO_DEPS)
	touch $@

$(VENV)/.r21d-installed: $(VENV)/.r21d-deps setup.py pyproject.toml MANIFEST.in $(CSRC) $(ROOTS)
	$(PIP) install --no-build-isolation -e '.[test,bench]'
	touch $@

# The oldest supported pair (README: Platforms) in a second venv, .venv-oldest: torch 2.11 with its
# Triton 3.6, and NumPy < 2.4 (Triton 3.6's interpreter fails with NumPy 2.4; r21d refuses that
# pair at import). Runs the static report for sm_90 (tests/tools/test_static.py), the version checks,
# an interpreter subset of every kernel family and the launch plans' binding of kernel parameters
# (Triton 3.6's binder: the GPU machines' version), with a Triton cache of its own; pure Python
# (r21d._C is built for the main venv's torch). CI runs it after `make test`.
OLD_VENV  := .venv-oldest
# Triton 3.6's own cache, outside the checkout like the main venv's (~/.triton/cache): a fresh
# clone reuses what an earlier run compiled (its static report: minutes when cold)
OLD_TRITON_CACHE ?= $(HOME)/.triton/cache-r21d-oldest
OLD_PY    := $(OLD_VENV)/bin/python
OLD_DEPS  := torch==2.11.0 triton==3.6.0 'numpy<2.4' 'setuptools>=64' wheel pytest hypothesis \
             expecttest
PW_TEST   := tests/kernels/test_pointwise.py
DW_TEST   := tests/kernels/test_depthwise.py
IG_TEST   := tests/kernels/test_implicit_gemm.py
UNIT_TEST := tests/kernels/test_conv2plus1d.py
OLD_TESTS := tests/kernels/test_triton_compat.py tests/tools/test_static.py \
  tests/kernels/test_replay.py::test_parameters_are_bound_as_tritons_binder_binds_them \
  tests/kernels/test_replay.py::test_a_compiled_launch_is_replayed_with_every_parameter_bound_in_order \
  '$(PW_TEST)::test_forward_backward_matches_oracle[cpu-fp32-residual-cl3d-train]' \
  '$(PW_TEST)::test_forward_backward_matches_oracle[cpu-fp16-stride2-pad1-eval]' \
  '$(PW_TEST)::test_large_mean_offset_is_numerically_safe[cpu-fp32]' \
  '$(DW_TEST)::test_forward_backward_matches_oracle[triton-cpu-fp32-3x3x3-train]' \
  '$(DW_TEST)::test_forward_backward_matches_oracle[triton-cpu-fp16-3x3x3-cl3d-residual-eval]' \
  '$(DW_TEST)::test_forward_backward_matches_oracle[triton-cpu-fp32-1x3x3-stride2-hw-train]' \
  '$(IG_TEST)::test_forward_backward_matches_oracle[cpu-fp32-spatial-1x3x3-cl3d-train]' \
  '$(IG_TEST)::test_forward_backward_matches_oracle[cpu-fp16-temporal-3x1x1-residual-train]' \
  '$(IG_TEST)::test_forward_backward_matches_oracle[cpu-fp32-dense-3x3x3-flat-dilated-silu-train]' \
  '$(IG_TEST)::test_forward_backward_matches_oracle[cpu-fp32-grouped-tap-major-cl3d-train]' \
  '$(IG_TEST)::test_forward_backward_matches_oracle[cpu-fp16-grouped-flat-eval]' \
  '$(UNIT_TEST)::test_eval_unit_matches_oracle[cpu-fp32-odd-channels-residual]' \
  '$(UNIT_TEST)::test_eval_unit_matches_oracle[cpu-fp16-downsample-stride2]' \
  '$(UNIT_TEST)::test_training_unit_matches_oracle[cpu-fp32-r2plus1d-like-aligned]' \
  '$(UNIT_TEST)::test_training_unit_matches_oracle[cpu-fp16-stem-1x7x7-stride2]'

# (NumPy 2.3 warns at each scalar Triton 3.6's interpreter converts: thousands of lines, ignored)
test-oldest: $(OLD_VENV)/.r21d-installed
	TRITON_CACHE_DIR=$(OLD_TRITON_CACHE) $(OLD_PY) -m pytest -q -p no:cacheprovider \
	  -W 'ignore:Conversion of an array with ndim > 0:DeprecationWarning' $(OLD_TESTS)

$(OLD_PY):
	$(PYTHON) -m venv $(OLD_VENV)

$(OLD_VENV)/.r21d-deps: Makefile | $(OLD_PY)
	$(OLD_PY) -m pip install -q --progress-bar off $(OLD_DEPS)
	touch $@

$(OLD_VENV)/.r21d-installed: $(OLD_VENV)/.r21d-deps setup.py pyproject.toml MANIFEST.in $(ROOTS)
	R21D_SKIP_CUDA_BUILD=1 $(OLD_PY) -m pip install -q --no-build-isolation --no-deps -e .
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
	rm -rf build dist *.egg-info r21d/_C*.so $(VENV)/.r21d-installed $(OLD_VENV)/.r21d-installed .pytest_cache
	find . \( -path ./$(VENV) -o -path ./$(OLD_VENV) \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
