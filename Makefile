# finstream — every entry point a developer or CI needs.
# `make run` and `make test` do all set-up on a fresh machine.

PYTHON ?= python3
UV_VERSION ?= 0.13.9
TOOLS := .tools
UV := $(TOOLS)/uv/bin/uv
VENV := .venv
BIN := $(VENV)/bin
FINSTREAM := $(BIN)/finstream
PYTEST_ARGS ?=

.PHONY: help install lock lint format stack-up stack-down stack-status topics migrate run test test-unit test-integration bench clean tools

help:
	@grep -E '^[a-z-]+:.*?## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(UV):
	$(PYTHON) -m venv $(TOOLS)/uv
	$(TOOLS)/uv/bin/pip install -q "uv==$(UV_VERSION)"

$(VENV)/.installed: $(UV) requirements.lock pyproject.toml
	test -d $(VENV) || $(UV) venv -q --python $(PYTHON) $(VENV)
	$(UV) pip sync -q --python $(BIN)/python requirements.lock
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

install: $(VENV)/.installed ## Create .venv from the lock file

lock: $(UV) ## Re-resolve requirements.lock from pyproject.toml
	$(UV) pip compile -q --python-version 3.11 --extra dev -o requirements.lock pyproject.toml
	$(UV) pip compile -q --python-version 3.11 --generate-hashes --constraint requirements.lock -o deploy/image/requirements.txt pyproject.toml

lint: install ## ruff and mypy (strict on src/)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

stack-up: install ## Start Kafka, PostgreSQL and Redis (no-op when running)
	$(FINSTREAM) stack up

stack-down: install ## Stop what stack-up started
	$(FINSTREAM) stack down

stack-status: install
	$(FINSTREAM) stack status

topics: stack-up ## Apply topics.yaml to the local broker
	$(FINSTREAM) topics apply

migrate: stack-up ## Apply PostgreSQL migrations
	$(FINSTREAM) db migrate

run: install ## Run the whole pipeline locally (Ctrl-C stops it)
	$(FINSTREAM) run

test: stack-up tools ## Unit, integration and end-to-end tests against the real local stack
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench: stack-up ## Benchmarks, each against a baseline measured in the same run
	$(BIN)/python -m bench

tools: $(UV) ## helm, kubeconform, checkov, hadolint, toxiproxy and offline schemas into .tools (idempotent)
	UV=$(UV) PYTHON=$(PYTHON) bash deploy/tools/install.sh

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
