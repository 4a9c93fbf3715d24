# Whistle developer tasks. Needs only python3, node, npm and GNU make.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: help install run test lint format clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'
	@echo "  (make test PYTEST_ARGS='-x -k name' passes flags to pytest)"

install: $(VENV)/.installed static/vendor/.copied ## Create .venv, install Python + npm deps, copy assets

# Stamp files keep `make install` (and so `make test`) a no-op until a manifest changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# $(wildcard) so a missing lock falls back to `npm install` instead of "no rule to make".
node_modules/.installed: package.json $(wildcard package-lock.json)
	if [[ -f package-lock.json ]]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
	touch $@

static/vendor/.copied: node_modules/.installed scripts/copy_assets.mjs
	node scripts/copy_assets.mjs
	touch $@

run: install ## Run the whole product locally (embedded services, demo data, honcho)
	$(BIN)/whistle dev

test: install ## Lint, check formatting, then run pytest
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## ruff format, then ruff check --fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Remove .venv, node_modules and static/vendor (keeps .data)
	rm -rf $(VENV) node_modules static/vendor
