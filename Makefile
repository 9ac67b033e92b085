# make demo  - set up .venv and run the demo (simulator + one weex_sync pass + example queries)
# make test  - set up .venv and run the whole test suite against the local PostgreSQL
# make bench - run the benchmark (bench/README.md)
# make lint / make typecheck - ruff, mypy (settings in pyproject.toml; CI runs both)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench lint typecheck venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt dev/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r dev/requirements.txt
	touch $@

demo: venv
	$(PY) dev/demo.py

test: venv
	$(PY) -m pytest -n 2

bench: venv
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) bench/run_bench.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy
