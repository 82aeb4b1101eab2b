# The two commands: `make reproduce` (every table and figure, embedded default, CPU, offline)
# and `make test`. Both set up .venv by themselves; re-runs skip installs that are done.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= embedded
# CPU build of torch for machines without CUDA; a CUDA torch already visible to $(PYTHON) is kept.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= gguf,eval,recovery,notebooks,dev,ray
STAMP := $(VENV)/.mpt-installed

.PHONY: setup test reproduce lab bench lint clean-reports

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	@VENV="$(VENV)" PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" EXTRAS="$(EXTRAS)" bash scripts/setup_env.sh
	@touch $@

test: $(STAMP)
	$(PY) -m ruff check mpt_utils tests benchmarks scripts
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

reproduce: $(STAMP)
	$(PY) -m mpt_utils.reproduce --profile $(PROFILE) $(REPRODUCE_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks --profile $(PROFILE)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

lint: $(STAMP)
	$(PY) -m ruff check mpt_utils tests benchmarks scripts

clean-reports:
	rm -rf reports
