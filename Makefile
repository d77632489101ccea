# litlab — two set-up commands:
#   make demo   creates .venv, installs litlab, runs the default experiment (MLP on digits)
#   make test   creates .venv with the dev extras, runs the test-suite
# torch is installed FIRST, pinned, so pip never pulls a second multi-GB build; choose another
# build with e.g. `make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PIP    := $(VENV)/bin/python -m pip
QUIET  := --quiet --disable-pip-version-check

.PHONY: demo test install dev clean help

help:
	@echo "make demo   install litlab into $(VENV) and run experiments/mlp/mlp_digits.yaml"
	@echo "make test   install litlab with its dev extras into $(VENV) and run pytest"
	@echo "make clean  remove $(VENV) and the local tracking store (mlruns/)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(QUIET) --upgrade pip

$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) install $(QUIET) $(TORCH)
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install $(QUIET) -e .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.torch
	$(PIP) install $(QUIET) -e ".[dev]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

demo: $(VENV)/.installed
	$(VENV)/bin/litlab run experiments/mlp/mlp_digits.yaml

# Two pytest-xdist processes share the tests (each runs torch on one thread): 13 min of pytest on
# the project's 2-core machine (three were slower: 19 min where two took 17). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(VENV)/.dev-installed
	HF_DATASETS_OFFLINE=1 $(VENV)/bin/python -m pytest -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) mlruns/mlflow.db mlruns/artifacts mlruns/checkpoints mlruns/wandb
