# cio-worker: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install demo test test-unit test-integration lint format typecheck \
        broker-start broker-stop lock clean bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -m worker.sandbox.broker fetch
	touch $(STAMP)

install: $(STAMP) ## create .venv with the locked dependencies and fetch the Kafka jars

demo: install ## run the main job on a local broker, simulator and sample data
	$(BIN)/python -m worker.sandbox.demo

bench: install ## benchmark on its own broker (port 19292); BENCH_ARGS="--records 50000"
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench.run $(BENCH_ARGS)

test: install ## run the unit and integration tests (starts and stops the broker)
	$(BIN)/python -m pytest tests

test-unit: install ## run the unit tests only (no network)
	$(BIN)/python -m pytest tests/unit

test-integration: install ## run the integration tests only
	$(BIN)/python -m pytest tests/integration

lint: install ## ruff format check and ruff lint
	$(BIN)/ruff format --check worker tests
	$(BIN)/ruff check worker tests

format: install ## apply ruff's formatting and fixes
	$(BIN)/ruff format worker tests
	$(BIN)/ruff check --fix worker tests

typecheck: install ## mypy strict on the package
	$(BIN)/mypy

broker-start: install ## start the local Kafka broker on 127.0.0.1:19092
	$(BIN)/python -m worker.sandbox.broker start

broker-stop: ## stop the local Kafka broker
	$(BIN)/python -m worker.sandbox.broker stop

lock: ## re-resolve requirements.lock and requirements-dev.lock from pyproject.toml
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet .
	.lockenv/bin/pip freeze --exclude cio-worker > requirements.lock
	.lockenv/bin/pip install --quiet '.[dev]'
	.lockenv/bin/pip freeze --exclude cio-worker | grep -vxF -f requirements.lock > requirements-dev.lock
	rm -rf .lockenv

clean: broker-stop ## stop the broker and remove the venv and caches
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
