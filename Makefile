# The two commands: `make demo` and `make test`. Each creates .venv when missing and installs
# distseg into it once (re-installing only when pyproject.toml changes).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.distseg-installed

.PHONY: demo test test-slow lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, so nothing below can pull a different build
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/distseg demo

lint: $(STAMP)
	$(BIN)/ruff check distseg tests jobs
	$(BIN)/ruff format --check distseg tests jobs

test: lint
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf outputs .pytest_cache
