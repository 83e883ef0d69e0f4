# torchgate's front door: the same commands locally and in CI.
#   make serve   set up .venv and serve the bundled digits model on 127.0.0.1:8000
#   make test    set up .venv and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pins torch to the build this project's machines install from a local file; elsewhere
# `make install CONSTRAINTS=` (or plain `pip install .`) takes any torch>=2.3.
CONSTRAINTS ?= constraints.txt
CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint format bench models clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the constraint, so nothing after it can pull another build
	$(PY) -m pip install -q $(CONSTRAINT_FLAG) torch
	$(PY) -m pip install -q $(CONSTRAINT_FLAG) -e '.[dev]'
	touch $(STAMP)

# A local development key, created on first run, kept out of git (.gitignore).
DEV_KEY := .dev-key
DEV_KEYS := .dev-keys.toml

serve: install
	@if [ ! -s $(DEV_KEY) ] || [ ! -s $(DEV_KEYS) ]; then rm -f $(DEV_KEY) $(DEV_KEYS); \
	  $(VENV)/bin/torchgate keys new --name dev --scope admin \
	    --key-file $(DEV_KEY) --keys-file $(DEV_KEYS) >/dev/null && \
	  echo "created a development API key in $(DEV_KEY) (git-ignored)"; fi
	@echo "try: curl -s http://$(HOST):$(PORT)/predict -H \"Authorization: Bearer $$(cat $(DEV_KEY))\" -H 'content-type: application/json' -d @models/digits/example.json"
	TORCHGATE_API_KEYS_FILE=$(DEV_KEYS) $(VENV)/bin/torchgate serve --models models \
	  --default-model digits --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts

format: install
	$(VENV)/bin/ruff format src tests bench scripts
	$(VENV)/bin/ruff check --fix src tests bench scripts

models: install
	$(PY) scripts/train_digits.py --out models/digits

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/results
