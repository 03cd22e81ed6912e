# Two commands on a fresh machine: `make train` and `make test`. Both create .venv with pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Exact pins: one pip constraints file per stack (launch/stacks/*.txt); pyproject.toml keeps ranges.
# STACK=default: current torch (sm_75+ GPUs, CPUs). STACK=k80: torch 2.0.1, the newest with K80 kernels.
# The stack is recorded in .venv (.installed-STACK): switching stacks rebuilds .venv.
STACK ?= default
STACK_PINS := launch/stacks/$(STACK).txt
# What to install first under those pins; e.g. add `--index-url URL` for another CUDA build of them.
TORCH_PINS ?= torch torchvision
CONFIG ?= configs/mnist_mlp.yaml
ARGS ?=

.PHONY: install install-dev train launch test test-fast lint format bench clean

$(VENV)/.installed-$(STACK): pyproject.toml $(wildcard $(STACK_PINS))
	@test -f $(STACK_PINS) || { echo "error: STACK=$(STACK): no $(STACK_PINS) (stacks: $(notdir $(basename $(wildcard launch/stacks/*.txt))))" >&2; exit 2; }
	@if ls $(VENV)/.installed-* >/dev/null 2>&1 && ! test -f $@; then echo "$(VENV) holds another stack: rebuilding it for STACK=$(STACK)"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(STACK_PINS) $(TORCH_PINS)
	$(PY) -m pip install --quiet -c $(STACK_PINS) -e .
	touch $@

$(VENV)/.installed-dev-$(STACK): $(VENV)/.installed-$(STACK)
	$(PY) -m pip install --quiet -c $(STACK_PINS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed-$(STACK)
install-dev: $(VENV)/.installed-dev-$(STACK)

train: install
	$(VENV)/bin/gan-ddp train --config $(CONFIG) $(ARGS)

# The same training, started the way this machine suits: N GPUs, one GPU or CPU (launch/run.sh says which).
launch: install
	bash launch/run.sh --config $(CONFIG) $(ARGS)

# 3 pytest-xdist workers by default (~10.5 min on 2 cores, 2026-12-05, against ~11.3 with 2: the cluster tests wait
# on timeouts and leave a core idle; about 1.6x that serially; XDIST= runs it serially):
# --dist loadgroup keeps each group of tests/conftest.py in one worker (the cluster and slurm tests one after
# another; a module that shares a trained run), --no-loadscope-reorder keeps the collection order (the cluster
# tests first); every process the tests start uses one thread. The rare SIGABRT of a finished gloo run that kept
# this serial before is fixed (docs/faults.md, "Leaving a multi-process run").
XDIST ?= -n 3 --dist loadgroup --no-loadscope-reorder

test: install-dev
	$(PY) -m pytest -q $(XDIST)

test-fast: install-dev
	$(PY) -m pytest -q $(XDIST) -m "not multiprocess and not slow"

# ruff, then the layer contract in pyproject.toml ([tool.importlinter]): no import runs up a layer.
lint: install-dev
	$(VENV)/bin/ruff check gan_ddp tests
	$(VENV)/bin/ruff format --check gan_ddp tests
	$(VENV)/bin/lint-imports --no-cache

format: install-dev
	$(VENV)/bin/ruff format gan_ddp tests
	$(VENV)/bin/ruff check --fix gan_ddp tests

bench: install
	$(VENV)/bin/gan-ddp bench --config $(CONFIG) data.root=bundled data.split=test --baseline $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
