# Two commands on a fresh machine: `make setup`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CRD := crds/finetune.dev_finetunejobs.yaml
CHART_CRD := charts/finetune-operator/crds/finetune.dev_finetunejobs.yaml

.PHONY: setup test lint crd check quickstart

# torch first (a pinned release; a loose requirement would pull a multi-GB CUDA
# build on a CPU machine), then deepspeed, which ships only a source archive and
# must build against that torch, then the project with all its extras.
setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -e '.[operator,trainer,dev]'

test:
	$(BIN)/pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Regenerate everything derived from the API models.
crd:
	$(BIN)/finetune crd --output $(CRD)
	cp $(CRD) $(CHART_CRD)
	$(BIN)/python -m finetune.api.reference README.md

check: lint test

# A LoRA job on this machine's CPU with a tiny model and images made on the spot.
quickstart:
	$(BIN)/python -m finetune.assets examples/quickstart
	$(BIN)/finetune run examples/quickstart.yaml --nproc 2
