# tokred: `make train` and `make test` work on a fresh machine (they create .venv and install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# The locked set (what `make train` / `make test` install) and the oldest supported one (pyproject's lower bounds).
LOCK := requirements/lock.txt
OLDEST := requirements/oldest.txt
OLD_VENV := .venv-oldest
# The oldest Python pyproject.toml admits, where this machine has one that runs (on PATH or kept by pyenv).
OLDEST_PYTHON ?= $(firstword $(foreach py,python3.10 $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10),\
	$(shell $(py) -c 'print("$(py)")' 2>/dev/null)) $(PYTHON))

.DEFAULT_GOAL := help
.PHONY: help install lock train test support-matrix test-fast test-oldest lint format flops benchmark benchmark-gpu compare compare-hard report sweep clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(LOCK)
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install tokred with its test tools, at the locked versions

lock: ## re-resolve requirements/lock.txt: the newest releases pyproject.toml allows (then run make test)
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q ".[dev]"
	{ echo "# make lock: the versions make install uses ($$(.venv-lock/bin/python -V), $$(uname -m)); re-resolve with make lock"; \
	  .venv-lock/bin/pip freeze --exclude tokred; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

$(OLD_VENV)/.installed: pyproject.toml $(OLDEST)
	@test -d $(OLD_VENV) || $(OLDEST_PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/pip install -q --upgrade pip
	$(OLD_VENV)/bin/pip install -q -c $(OLDEST) -e ".[dev]"
	@touch $@

train: $(STAMP) ## train the default experiment (deit_tiny_cpu on the built-in dataset); ARGS="..." adds overrides
	$(BIN)/tokred-train $(ARGS)

test: $(STAMP) ## run the test suite (locked versions)
	$(BIN)/pytest -n 2 --dist loadgroup $(ARGS)

support-matrix: $(STAMP) ## rewrite the README's reducer x backbone support matrix from tests/test_support_matrix.py
	TOKRED_UPDATE_README=1 $(BIN)/pytest -q -n 0 tests/test_support_matrix.py -k readme

test-fast: $(STAMP) ## the suite without the tests marked slow (long end-to-end runs): a quick check while editing
	$(BIN)/pytest -n 2 --dist loadgroup -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff: lint and formatting check (configured in pyproject.toml; CI runs it)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

test-oldest: $(OLD_VENV)/.installed ## the smoke tests (every reducer end to end) on the oldest supported versions
	$(OLD_VENV)/bin/pytest -n 2 --dist loadgroup -m smoke $(ARGS)

flops: $(STAMP) ## analytic and counted GMACs: make flops ARGS="backbone=deit_small reducer=none"
	$(BIN)/tokred-flops $(ARGS)

benchmark: $(STAMP) ## speed and cost of every reducer vs none (~15 min on 2 CPU cores): make benchmark ARGS="batch_size=128"
	$(BIN)/tokred-benchmark $(ARGS)

benchmark-gpu: $(STAMP) ## every reducer on one GPU, bs 256 bf16, eager + compiled, inference + training (experiments/benchmark_gpu.sh)
	BIN=$(BIN) experiments/benchmark_gpu.sh $(ARGS)

compare: $(STAMP) ## accuracy comparison: baseline + every reducer at 2 budgets on the built-in data, then the report (~2 h on 2 cores)
	$(BIN)/tokred-compare $(ARGS)

compare-hard: $(STAMP) ## the seeded comparison on dataset=synthetic_hard: every reducer at 0.5, 3 seeds, intervals, paired tests (~3 h on 2 cores)
	$(BIN)/tokred-compare --config-name=compare_hard $(ARGS)

sweep: $(STAMP) ## Optuna Pareto search (top-1 vs GMACs) over Evo-ViT's knobs on the built-in data, 2 trials at a time; re-run to continue
	$(BIN)/tokred-train -m experiment=pareto_evo_vit hydra/launcher=joblib hydra.launcher.n_jobs=2 hydra.sweeper.n_jobs=2 $(ARGS)

RUNS ?= multirun/compare
report: $(STAMP) ## table and Pareto plots of the training runs under RUNS (default multirun/compare)
	$(BIN)/tokred-report runs_dir=$(RUNS) $(ARGS)

clean: ## remove run outputs (keeps the virtual environments)
	rm -rf outputs multirun .pytest_cache
