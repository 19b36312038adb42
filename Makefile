# Two commands for a fresh machine:  make demo  (set up + run the built-in demo)  and  make test  (set up + tests)
PY ?= python3
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench lint
setup:
	PYTHON=$(PY) bash scripts/setup.sh dev

demo: setup
	$(PY) -m alignflow.cli demo

test: setup
	$(PY) -m pytest tests -q -n 2

bench:
	PYTHON=$(PY) bash scripts/setup.sh dev,bench
	$(PY) bench/run_all.py

# ruff (lint and format check), mypy (strict where pyproject.toml says) and the docs link check; changes nothing.
# Every check runs, so one call reports all findings; the target fails if any check failed.
lint: setup
	@status=0; \
	$(PY) -m ruff check . || status=1; \
	$(PY) -m ruff format --check . || status=1; \
	$(PY) -m mypy || status=1; \
	$(PY) scripts/check_links.py || status=1; \
	exit $$status
