# crm-backend — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test demo bench lint typecheck services venv migrate clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

services:
	@bash scripts/ensure_services.sh

lint: venv
	$(BIN)/ruff check service handlers consumers tests bench
	$(BIN)/ruff format --check service handlers consumers tests bench

typecheck: venv
	$(BIN)/mypy

test: venv services lint typecheck
	$(BIN)/pytest -q

run: venv services
	@$(BIN)/python scripts/local_env.py
	$(BIN)/crm-backend migrate
	$(BIN)/crm-backend run

demo: venv services
	@$(BIN)/python scripts/local_env.py
	$(BIN)/crm-backend demo

migrate: venv services
	$(BIN)/crm-backend migrate

bench: venv services
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
