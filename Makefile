# Thin wrappers: every target calls a script or a tool, so what CI and a person run is
# the same command. `make help` lists them.

VENV    ?= .venv
PY      ?= $(VENV)/bin/python
CHART   := charts/lepton-operator
VERSION := 0.1.0
OPERATOR_IMAGE ?= lepton-ai/lepton-operator:$(VERSION)
TRAINER_IMAGE  ?= lepton-ai/lepton-trainer:$(VERSION)
# helm: the pinned binary scripts/helm.py installs (or $HELM if set).
HELM = $(shell $(PY) scripts/helm.py)

.DEFAULT_GOAL := help
.PHONY: help setup demo test unit integration e2e lint crds chart images kind-e2e bench

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## create .venv, install the project and fetch the control plane binaries
	bash scripts/setup.sh

demo: ## README command 1: local control plane, operator, two jobs that train and share the GPUs
	bash scripts/demo.sh

test: ## README command 2: setup, lint, then every test tier (kind skips with its reason without Docker)
	bash scripts/test.sh

unit: ## unit tier (tests/unit): no control plane; the trainer's tests skip without torch
	$(PY) -m pytest -m unit

integration: ## integration tier (tests/integration): the operator on the local control plane
	$(PY) -m pytest -m integration

e2e: ## local end-to-end tier (tests/locale2e): pods as processes, torchrun, Prometheus
	$(PY) -m pytest -m locale2e

lint: ## ruff check and ruff format --check on the whole repository
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

crds: ## regenerate crds/ from the models and copy them into the chart
	$(VENV)/bin/lepton-operator crd --write
	mkdir -p $(CHART)/crds
	cp crds/*.yaml $(CHART)/crds/

chart: ## helm lint --strict and render the chart in both RBAC modes
	$(HELM) lint --strict $(CHART)
	$(HELM) template lepton $(CHART) --namespace lepton-system > /dev/null
	$(HELM) template lepton $(CHART) --namespace lepton-system --set 'watchNamespaces={default}' > /dev/null
	@echo "chart OK"

images: ## docker build the operator and trainer images (build context: the repository)
	docker build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .
	docker build -f trainer_image/Dockerfile -t $(TRAINER_IMAGE) .

kind-e2e: ## kind end-to-end suite (creates a cluster, or reuses $LEPTON_KIND_CLUSTER)
	$(PY) -m pytest -m kind tests/e2e -rs -v

bench: ## benchmarks (operator latency, scale, memory; autoscaling policy)
	$(PY) benchmarks/autoscale.py && $(PY) benchmarks/control_plane.py $(BENCH_ARGS)
