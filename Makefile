# make test  : create .venv, install torch 2.14.1 + the project (CUDA extension built when nvcc is
#              present), run the test suite (Triton under the interpreter when there is no GPU).
# make bench : the benchmark suite (on a machine without a CUDA GPU: correctness through every
#              backend at small sizes, and the latest committed GPU results).
# make test-compat : the optimize, model and dynamic-compile tests against transformers 4.57.x (CI runs it too).
#
# bertkern._C is rebuilt only when csrc/, setup.py, pyproject.toml or the build settings below
# change: $(VENV)/.built is a stamp over those, and $(VENV)/.build-settings holds the settings of
# the last run (rewritten only when they differ, so its date says when they last changed).
# Python files need no rebuild: the install is editable.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
# Users get both archs; .ci/run sets TORCH_CUDA_ARCH_LIST=9.0+PTX (no GPU there: _C must compile,
# link and load). nvcc runs its device passes (cicc, ptxas) once per arch: sm_80's were 28% of
# bias_gelu.cu's compile and 50% of attention.cu's, the longest file (595 of 1191 s, 2 busy cores).
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
# pytest-xdist workers (auto: one per core); PYTEST_WORKERS=0 runs the suite in one process.
# loadfile: each test file on one worker, so a module-scoped fixture (the CUDA emulation's g++ build,
# test_triton_compile's compile of every case, test_packaging's sdist) is built once, not per worker.
# (Not loadgroup: xdist 3.8's xdist_group rewrites item._nodeid, which pytest 9.2 no longer reads.)
PYTEST_WORKERS ?= auto
PYTEST_ARGS := -n $(PYTEST_WORKERS) --dist loadfile -q -ra
# Build (and require) the CUDA extension whenever nvcc is on PATH; BERTKERN_BUILD_CUDA=0 skips it.
BERTKERN_BUILD_CUDA ?= $(if $(shell command -v nvcc),1,0)
export MAX_JOBS TORCH_CUDA_ARCH_LIST BERTKERN_BUILD_CUDA
TF457 ?= .venv-tf457

# _C is compiled against torch's headers: the torch pin is a build setting too (other lines of
# requirements-dev.txt are not, so adding a test dependency does not recompile the extension).
TORCH_PIN := $(shell grep -E '^torch[=<>~ ]' requirements-dev.txt)
BUILD_SETTINGS := BERTKERN_BUILD_CUDA=$(BERTKERN_BUILD_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) CUDA_HOME=$(CUDA_HOME) $(TORCH_PIN)
# At parse time, so that `make -n` sees the same dates as `make`.
_ := $(shell mkdir -p $(VENV) && echo '$(BUILD_SETTINGS)' | cmp -s - $(VENV)/.build-settings \
	|| echo '$(BUILD_SETTINGS)' > $(VENV)/.build-settings)

.PHONY: test test-compat bench install gpu-check clean

$(VENV)/.deps: requirements-dev.txt
	@echo "installing requirements-dev.txt into $(VENV) (first time: ~6 GB, torch with its CUDA libraries)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# pip -v streams the build; the filter shows one line per compiled file ("[3/8] .../attention.o")
# instead of minutes of silence, and the whole log is kept for when it fails.
$(VENV)/.built: $(VENV)/.build-settings setup.py pyproject.toml $(wildcard csrc/*) | $(VENV)/.deps
	@echo "building bertkern ($(BUILD_SETTINGS) MAX_JOBS=$(MAX_JOBS)); the CUDA extension takes 8-15 min on 2 cores; log: $(VENV)/build.log"
	@set -o pipefail; start=$$(date +%s); \
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee $(VENV)/build.log \
		| sed -un -e 's|^ *\(\[[0-9]*/[0-9]*\]\) .* -o \([^ ]*\).*|  \1 \2|p' -e '/bertkern setup/p' \
		|| { tail -n 40 $(VENV)/build.log; echo "bertkern build failed: $(VENV)/build.log"; exit 1; }; \
	echo "bertkern installed in $$(( $$(date +%s) - start )) s"
	touch $@

install: $(VENV)/.built

test: install
	BERTKERN_REQUIRE_CUDA_EXT=$(BERTKERN_BUILD_CUDA) $(PY) -m pytest tests $(PYTEST_ARGS)

# transformers 4.57.x in a small folder put ahead of the venv's transformers 5 (~140 MB, ~45 s):
# with the hub and tokenizers releases it needs, and requests (hub 0.x); the rest comes from the venv.
$(TF457)/.done: | $(VENV)/.deps
	$(PY) -m pip install -q --no-deps --target $(TF457) 'transformers==4.57.*' 'huggingface-hub<1.0' \
		'tokenizers>=0.22,<=0.23.0' requests urllib3 charset-normalizer certifi
	touch $@

test-compat: install $(TF457)/.done
	PYTHONPATH=$(TF457) $(PY) -m pytest tests/test_optimize.py tests/test_models.py tests/test_compile_dynamic.py $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run.py

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info bertkern/_C*.so bertkern/_build_config.json $(VENV)/.built
