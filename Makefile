# crm-backend — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-llm test-slow llm-server cluster cluster-stop demo bench lint typecheck services venv migrate clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

services:
	@bash scripts/ensure_services.sh

# llama.cpp's server (prebuilt xllamacpp wheel) and Gemma 3 270M, in a venv outside the
# checkout (~/.cache/crm-backend/llm); a no-op once installed.
llm-server:
	@bash scripts/ensure_llm_server.sh

lint: venv
	$(BIN)/ruff check service handlers consumers tests bench
	$(BIN)/ruff format --check service handlers consumers tests bench

typecheck: venv
	$(BIN)/mypy

test: venv services llm-server lint typecheck
	$(BIN)/pytest -q

# Only the tests against the real local model server (they are part of `make test` too).
test-llm: venv services llm-server
	$(BIN)/pytest -q -s tests/test_llm_server.py

# Real-cluster suite (a private 3-node RabbitMQ started and removed by the tests): node
# loss under load, shard rebalancing across processes. About 2 minutes; not in `make test`.
test-slow: venv services
	$(BIN)/pytest -q -m slow

# A private 3-node RabbitMQ cluster on AMQP ports 5681-5683 (see scripts/cluster.sh).
cluster:
	@bash scripts/cluster.sh start

cluster-stop:
	@bash scripts/cluster.sh stop

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
