# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test test-fast lint bench bench-quality load demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: install python3-venv (apt-get install -y python3-venv)"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: install
	$(VENV)/bin/uvicorn app.main:app --host 0.0.0.0 --port $${PORT:-8000}

# Against the service of `make run` on the same PORT (or SLIDE_URL).
demo: install
	SLIDE_URL="$${SLIDE_URL:-http://127.0.0.1:$${PORT:-8000}}" $(PY) -m app.demo

test: install
	$(PY) -m pytest -q --durations=15

# The edit-test loop: all but the tiers marked slow, e2e, faults and browser (markers in pyproject.toml).
test-fast: install
	$(PY) -m pytest -q -m "not (slow or e2e or faults or browser)" --durations=10

# ruff (lint + format) and mypy, configured in pyproject.toml; CI runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) benchmarks/run.py

# Quality against napkinXC, Omikuji, PECOS and PyTorch dense on real and synthetic sets (BENCHMARKS.md); the
# WordNet sets need `apt-get install -y wordnet-base`, debtags the lists of `apt-get update`. A subset:
# make bench-quality QUALITY_ARGS="--sets debtags --systems slide,pecos"
bench-quality: install
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) benchmarks/quality/run.py $(QUALITY_ARGS)

# Predict load (locust) while a job trains on amazon670k-shaped data, then after it stops; ~30 minutes with
# the defaults. A quick look: make load LOAD_ARGS="--preset small --duration 30"
load: install
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) benchmarks/load.py $(LOAD_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
