# Two commands on a fresh machine: `make setup`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CRD := crds/finetune.dev_finetunejobs.yaml
CHART_CRD := charts/finetune-operator/crds/finetune.dev_finetunejobs.yaml

.PHONY: setup system-packages test test-loaded lint crd check quickstart
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# torch first (a pinned release; a loose requirement would pull a multi-GB CUDA
# build on a CPU machine), then deepspeed, which ships only a source archive and
# must build against that torch, then the project with all its extras.
setup: system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -e '.[operator,trainer,dev]'
	$(BIN)/python -m finetune.trainer.engine.comm_op  # DeepSpeed's CPU comm op, built once here

# Debian's Prometheus and Pushgateway: the dashboard's queries are tested against them.
system-packages:
	@if ! command -v prometheus >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then \
		$(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends prometheus prometheus-pushgateway; \
	fi

test:
	$(BIN)/pytest

# The suite beside two CPU-burning processes, the way a busy CI runner sees it: tests
# must wait on events, never race a fixed sleep. The burners end with the suite.
test-loaded:
	@$(BIN)/python -c 'while True: pass' & one=$$!; \
	$(BIN)/python -c 'while True: pass' & two=$$!; \
	trap 'kill $$one $$two' EXIT INT TERM; \
	$(BIN)/pytest $(PYTEST_ARGS)

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
