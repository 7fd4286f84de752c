# SnapSell messaging backend — every command a developer needs.
# `make run` and `make test` set everything up on a fresh machine with Python 3.11+ and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Every dependency, transitive ones included, pinned with the hashes of all its published files
# (Python 3.11, Linux x86_64): the image installs the runtime lock, make the dev lock.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
# pip and the build backend of our two packages are locked too (they build without isolation).
LOCK_TOOLS := pip 'setuptools>=68'
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml contracts/python/pyproject.toml - --quiet \
	--generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)

.DEFAULT_GOAL := help
.PHONY: help venv lock protos contracts-baseline lint format test chaos restore-drill run webhook bench deploy-check images deploy-init deploy

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml contracts/python/pyproject.toml $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e ./contracts/python -e .
	touch $@

venv: $(INSTALLED) ## create the virtualenv and install the locked dependencies

lock: $(INSTALLED) ## regenerate the lock files from pyproject.toml (UPGRADE=1: newest allowed transitive pins)
	printf '%s\n' $(LOCK_TOOLS) | $(UV_COMPILE) -o $(LOCK)
	printf '%s\n' $(LOCK_TOOLS) | $(UV_COMPILE) --extra dev -c $(LOCK) -o $(DEV_LOCK)

protos: $(INSTALLED) ## regenerate the Python stubs from protos/
	$(BIN)/buf format -w
	$(BIN)/python -m tools.protos generate

contracts-baseline: $(INSTALLED) ## record the current protos as the released baseline for `buf breaking`
	$(BIN)/buf build -o protos/baseline.binpb

lint: $(INSTALLED) ## ruff lint and format check, import contracts and mypy --strict (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

format: $(INSTALLED) ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint ## make lint, then the whole test suite (starts embedded PostgreSQL and NATS unless DATABASE_URL / NATS_URL are set)
	$(BIN)/python -m tools.deploy check
	$(BIN)/python -m pytest

# `make chaos CHAOS_WEBHOOKS=20000` for a longer run; `make test` runs the suite reduced.
CHAOS_WEBHOOKS ?= 5000
CHAOS_RATE ?= 40
# The NATS cluster scenario's pace: every write is fsynced on two NATS servers of three.
CHAOS_CLUSTER_RATE ?= 20

chaos: $(INSTALLED) ## the fault suite at full size: 5,000 webhooks through kills and outages; prints its counts
	SNAPSELL_CHAOS_WEBHOOKS=$(CHAOS_WEBHOOKS) SNAPSELL_CHAOS_RATE=$(CHAOS_RATE) \
		SNAPSELL_CHAOS_CLUSTER_RATE=$(CHAOS_CLUSTER_RATE) $(BIN)/python -m pytest tests/chaos -q -s

# `make restore-drill DRILL_SHOPS=20 DRILL_CLIENTS=100` for a bigger one; `make test` runs it reduced.
DRILL_SHOPS ?= 10
DRILL_CLIENTS ?= 40

restore-drill: $(INSTALLED) ## PostgreSQL point-in-time restore under load: base backup + WAL archive, restore, services on it; prints its counts
	SNAPSELL_DRILL_SHOPS=$(DRILL_SHOPS) SNAPSELL_DRILL_CLIENTS=$(DRILL_CLIENTS) $(BIN)/python -m pytest tests/drills -q -s

run: $(INSTALLED) ## the whole stack in the foreground (Ctrl-C stops it)
	@$(BIN)/python -m tools.run

webhook: $(INSTALLED) ## send a signed sample webhook to the running stack: make webhook BODY=A12 FROM=whatsapp:+336... TO=whatsapp:+1415...
	@$(BIN)/python -m tools.send_webhook $(if $(BODY),--body "$(BODY)") $(if $(FROM),--from "$(FROM)") $(if $(TO),--to "$(TO)")

bench: $(INSTALLED) ## every benchmark, several runs each; writes docs/BENCHMARKS.md
	$(BIN)/python -m tools.bench

deploy-check: $(INSTALLED) ## render every overlay, validate offline (Kubernetes 1.32, strict) and check the deploy policies
	$(BIN)/python -m tools.deploy check
	$(BIN)/python -m pytest tests/deploy -q

images: $(INSTALLED) ## build the image: make images [IMAGE_TAG=...] [IMAGE_REPO=...] [IMAGE_BASE=local|official] [PUSH=1] (docker, podman or buildah)
	$(BIN)/python -m tools.deploy images --tag "$(IMAGE_TAG)" --repo "$(IMAGE_REPO)" --base "$(IMAGE_BASE)" $(if $(PUSH),--push)

deploy-init: $(INSTALLED) ## this installation's values, outside tracked files: make deploy-init NAME=... [HOST=...] [IMAGE_REPO=...] [BACKUP_PATH=s3://...]
	$(BIN)/python -m tools.deploy init --name "$(NAME)" --host "$(HOST)" --image-repo "$(IMAGE_REPO)" --backup-path "$(BACKUP_PATH)"

deploy: $(INSTALLED) ## deploy to Kubernetes: make deploy ENV=local|prod|<installation> IMAGE_TAG=... [IMAGE_REPO=...]
	$(BIN)/python -m tools.deploy deploy --env "$(ENV)" --image-tag "$(IMAGE_TAG)" --image-repo "$(IMAGE_REPO)"
