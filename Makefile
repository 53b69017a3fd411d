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

.PHONY: help install lock lint format stack-up stack-down stack-status topics migrate run test test-unit test-integration bench clean tools mailpit console

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

run: install mailpit console ## Run the whole pipeline locally (Ctrl-C stops it)
	$(FINSTREAM) run

test: stack-up tools console ## Unit, integration and end-to-end tests against the real local stack
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# The benchmarks' anchor (Quix Streams) runs in a virtualenv of its own, so that
# its dependencies never constrain finstream's.
ANCHOR := $(TOOLS)/anchor-venv
$(ANCHOR)/.installed: $(UV) bench/anchor/requirements.txt
	test -d $(ANCHOR) || $(UV) venv -q --python $(PYTHON) $(ANCHOR)
	$(UV) pip install -q --python $(ANCHOR)/bin/python -r bench/anchor/requirements.txt
	touch $@

bench: stack-up $(ANCHOR)/.installed ## Benchmarks, each beside a baseline (and the Quix Streams anchor) measured in the same run
	$(BIN)/python -m bench $(BENCH)

tools: $(UV) ## helm, kubeconform, checkov, hadolint, toxiproxy and offline schemas into .tools (idempotent)
	UV=$(UV) PYTHON=$(PYTHON) bash deploy/tools/install.sh

# The console's JavaScript dependencies: from the npm registry, pinned by
# deploy/console/package-lock.json, copied into the package as plain files.
CONSOLE_VENDOR := src/finstream/api/console/vendor
$(CONSOLE_VENDOR)/.built: deploy/console/package.json deploy/console/package-lock.json
	npm ci --prefix deploy/console --no-audit --no-fund --ignore-scripts --loglevel=error
	mkdir -p $(CONSOLE_VENDOR)
	cp deploy/console/node_modules/lightweight-charts/dist/lightweight-charts.standalone.production.js $(CONSOLE_VENDOR)/
	cp deploy/console/node_modules/lightweight-charts/LICENSE $(CONSOLE_VENDOR)/lightweight-charts.LICENSE
	touch $@

console: $(CONSOLE_VENDOR)/.built ## The console's JS dependencies (npm, from the lock file)

mailpit: $(UV) ## Mailpit (SMTP + web UI for make run) into .tools/bin (built once)
	UV=$(UV) PYTHON=$(PYTHON) bash deploy/tools/install.sh mailpit

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
