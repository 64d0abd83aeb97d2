# The README's two commands: `make demo` (set up + main job) and `make test` (set up + test suite).
# Each creates .venv on first use and installs the pinned, tested set of packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first: deepspeed and fairscale ship as sdists whose builds import torch (no build isolation).
$(STAMP): requirements/torch.txt requirements/lock.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements/torch.txt -c requirements/lock.txt
	$(PIP) --no-build-isolation -r requirements/lock.txt
	$(PIP) --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs data
