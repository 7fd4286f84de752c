# SnapSell messaging backend — every command a developer needs.
# `make run` and `make test` set everything up on a fresh machine with Python 3.11+ and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv protos protos-check contracts-baseline lint format test run

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml contracts/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./contracts/python -e '.[dev]'
	touch $@

venv: $(INSTALLED) ## create the virtualenv and install pinned dependencies

protos: $(INSTALLED) ## regenerate the Python stubs from protos/
	$(BIN)/buf format -w
	$(BIN)/python -m tools.protos generate

contracts-baseline: $(INSTALLED) ## record the current protos as the released baseline for `buf breaking`
	$(BIN)/buf build -o protos/baseline.binpb

lint: $(INSTALLED) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED) ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(INSTALLED) ## the whole test suite (starts embedded PostgreSQL and NATS unless DATABASE_URL / NATS_URL are set)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

run: $(INSTALLED) ## the whole stack in the foreground (Ctrl-C stops it)
	$(BIN)/python -m tools.run
