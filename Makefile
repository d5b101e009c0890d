# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv run test lint typecheck unit integration clean

help:
	@echo "make run        start local NATS/Redis if none answer, provision streams, run the service (Ctrl-C stops all)"
	@echo "make test       lint (ruff), type-check (mypy --strict) and the whole test suite"
	@echo "make unit       unit tests only (no servers)"
	@echo "make integration  integration tests only (real nats-server and redis-server)"
	@echo "make lint / make typecheck / make clean"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: venv
	$(PY) tools/run_local.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy --strict cdc_service

unit: venv
	$(VENV)/bin/pytest tests/unit

integration: venv
	$(VENV)/bin/pytest tests/integration

test: lint typecheck
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache
