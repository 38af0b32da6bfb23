# Two entry points, both usable on a fresh machine:
#   make demo   set up .venv, build the demo shards, train Stage 1 + Stage 2 on CPU, evaluate, export
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup test lint demo demo-full clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,demo,app]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# `make test` lints first (ruff check + format check), so CI, which runs `make test`, runs `make lint`.
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check patchalign zerokey tests
	$(VENV)/bin/ruff format --check patchalign zerokey tests

# The no-Stage-1 baseline doubles the training time on 2 CPU cores: `make demo` skips it (and says so),
# `make demo-full` runs it.
demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m patchalign demo --no-baseline

demo-full: setup
	HF_HUB_OFFLINE=1 $(PY) -m patchalign demo

clean-demo:
	rm -rf shards/demo outputs/demo
