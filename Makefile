# dalle_dist: `make install` builds .venv; `make test` installs if needed and runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Device for smoke runs: cuda when a GPU is visible, else cpu.
DEVICE  ?= auto

.PHONY: help install test test-small demo lint format plan bench-powersgd bench-data bench-memory clean

help:
	@echo "make install     create $(VENV) with torch==2.13.0 and dalle_dist (editable)"
	@echo "make test        install if needed, lint, run the tests"
	@echo "make test-small  a few real training steps of each stage on the tiny config (GPU if present)"
	@echo "make demo        the whole pipeline on the synthetic set on CPU (~12 min) -> runs/demo/report.md"
	@echo "make plan        parameter/memory plan of the 12B prior and the openai dVAE"
	@echo "make lint        ruff check + format check + hadolint"
	@echo "make bench-powersgd / bench-data / bench-memory   benchmarks (one JSON object each)"

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	# Pin torch first: GPU images may carry older builds, and an unpinned resolve pulls CUDA wheels.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/Dockerfile

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) lint
	bash launch/local/install_system_deps.sh
	$(BIN)/python -m pytest -q

test-small: $(STAMP)
	$(BIN)/dalle-dist train-dvae --config configs/dvae/tiny.yaml --train.steps 5 --train.log_every 1 \
		--train.device $(DEVICE) --train.resume false --train.out_dir runs/test-small/dvae
	$(BIN)/dalle-dist train-prior --config configs/prior/tiny.yaml --train.steps 5 --train.log_every 1 \
		--train.device $(DEVICE) --train.resume false --train.out_dir runs/test-small/prior

# Data → tokenizer → dVAE → prior (torchrun, 2 gloo processes) → samples → reranking → eval → report.
# Continues a previous runs/demo; DEMO_ARGS=--fresh starts over.
demo: $(STAMP)
	$(BIN)/dalle-dist demo --out runs/demo $(DEMO_ARGS)

bench-powersgd: $(STAMP)
	$(BIN)/python benchmarks/powersgd.py

bench-data: $(STAMP)
	$(BIN)/python benchmarks/data_throughput.py

# A 302M prior trained on 1 and 2 CPU gloo processes per topology: each rank's measured peak vs plan --dry-run's.
bench-memory: $(STAMP)
	$(BIN)/python benchmarks/memory.py

plan: $(STAMP)
	$(BIN)/dalle-dist plan --prior 12B --dvae openai

clean:
	rm -rf runs/test-small .pytest_cache
