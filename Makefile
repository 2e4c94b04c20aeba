# Quick start: `make demo`, `make test`. Everything runs in .venv, CPU-only torch by default.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Installed before the package so that pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,hf,plot
RUNS ?= runs

.PHONY: install demo test bench experiment clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/multitoken demo --out $(RUNS)/demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/multitoken bench memory --json bench/memory.json --markdown bench/memory.md

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
