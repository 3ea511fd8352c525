# The two commands of the README: `make dev` runs the whole stack, `make test` runs the tests.
# Both create the virtual environment .venv from pyproject.toml on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: dev test test-unit bench bench-smoke clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

dev: $(BIN)/.installed
	$(BIN)/cem dev --simulate

test: $(BIN)/.installed
	$(BIN)/python -m pytest

test-unit: $(BIN)/.installed
	$(BIN)/python -m pytest tests/unit

bench: $(BIN)/.installed
	$(BIN)/python -m bench

bench-smoke: $(BIN)/.installed
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) .cem .pytest_cache .hypothesis
