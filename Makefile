# fewshot_runner: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline machines with a shared data folder beside the checkout use it; elsewhere the
# default ~/.cache/fewshot (or an existing $FEWSHOT_DATA) is kept.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/omniglot),)
export FEWSHOT_DATA ?= $(SHARED_DATA)
endif
export MALLOC_MMAP_THRESHOLD_ ?= 1000000000
export MALLOC_TRIM_THRESHOLD_ ?= 100000000000

.PHONY: help install run test test-all bench smoke clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(BIN)/fewshot: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/fewshot

install: $(BIN)/fewshot ## create .venv and install the package with its dev extras

run: install ## train the default preset (ProtoNet, Omniglot 5-way 1-shot, < 10 min on 2 CPU cores)
	$(BIN)/fewshot train experiment=protonet_omniglot_quick

smoke: install ## a CPU smoke run on synthetic data (seconds)
	$(BIN)/fewshot train debug=smoke

test: install ## run the test suite (no slow or GPU tests)
	$(BIN)/python -m pytest

test-all: install ## run every test, slow ones included (no GPU tests)
	$(BIN)/python -m pytest -m 'not gpu'

bench: install ## CPU speed benchmark table (scripts/bench.py)
	$(BIN)/python scripts/bench.py

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache
