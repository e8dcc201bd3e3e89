# `make demo` and `make test` each install what they need first, so either works as the first command typed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(PY) run.py experiment=demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache runs multirun .pytest_cache
