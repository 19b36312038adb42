# Two commands for a fresh machine:  make demo  (set up + run the built-in demo)  and  make test  (set up + tests)
PY ?= python3
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench lint
setup:
	PYTHON=$(PY) bash scripts/setup.sh dev

demo: setup
	$(PY) -m alignflow.cli demo

test: setup
	$(PY) -m pytest tests -q

bench:
	PYTHON=$(PY) bash scripts/setup.sh dev,bench
	$(PY) bench/run_all.py

# ruff (lint and format check), mypy (strict where pyproject.toml says) and the docs link check; changes nothing
lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) scripts/check_links.py
