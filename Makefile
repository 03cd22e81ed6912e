# Two commands on a fresh machine: `make train` and `make test`. Both create .venv with pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Exact pins for these machines (pip takes them from local disk); pyproject.toml keeps ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/mnist_mlp.yaml
ARGS ?=

.PHONY: install install-dev train launch test test-fast lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

train: install
	$(VENV)/bin/gan-ddp train --config $(CONFIG) $(ARGS)

# The same training, started the way this machine suits: N GPUs, one GPU or CPU (launch/run.sh says which).
launch: install
	bash launch/run.sh --config $(CONFIG) $(ARGS)

test: install-dev
	$(PY) -m pytest -q

test-fast: install-dev
	$(PY) -m pytest -q -m "not multiprocess and not slow"

lint: install-dev
	$(VENV)/bin/ruff check gan_ddp tests
	$(VENV)/bin/ruff format --check gan_ddp tests

format: install-dev
	$(VENV)/bin/ruff format gan_ddp tests
	$(VENV)/bin/ruff check --fix gan_ddp tests

bench: install
	$(VENV)/bin/gan-ddp bench --config $(CONFIG) data.root=../shared/data/mnist data.split=test --baseline $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
