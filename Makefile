# make test   : create .venv, install torch 2.14.1 + the project (CUDA extension built when nvcc is
#               present), run the test suite (Triton under the interpreter when there is no GPU).
# make bench  : the benchmark suite (on a machine without a CUDA GPU: correctness through every
#               backend at small sizes, and the latest committed GPU results).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# Build (and require) the CUDA extension whenever nvcc is on PATH; BERTKERN_BUILD_CUDA=0 skips it.
BERTKERN_BUILD_CUDA ?= $(if $(shell command -v nvcc),1,0)
export MAX_JOBS TORCH_CUDA_ARCH_LIST BERTKERN_BUILD_CUDA

.PHONY: test bench install gpu-check clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.deps
	@echo "building bertkern (BERTKERN_BUILD_CUDA=$(BERTKERN_BUILD_CUDA), archs $(TORCH_CUDA_ARCH_LIST), MAX_JOBS=$(MAX_JOBS))"
	time $(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: install
	BERTKERN_REQUIRE_CUDA_EXT=$(BERTKERN_BUILD_CUDA) $(PY) -m pytest tests -q -ra

bench: install
	$(PY) benchmarks/run.py

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info bertkern/_C*.so
