# The README's two commands: `make demo` (set up + main job) and `make test` (set up + test suite).
# Each creates .venv on first use and installs the pinned, tested set of packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test clean setup-torch211 test-torch211 device-wheels gpu-check-dry-run

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

# A second environment on the lent GPU machine's torch (2.11, Python 3.12 where there is one) for a fast subset.
# PyPI has only the CUDA build of torch; its CUDA libraries (same cu13 sonames) are linked from .venv instead of
# downloaded again (3.2 GB): they are loaded at import and never used on CPU. Cost: ~0.6 GB download, ~2 GB disk.
T211 ?= .venv-torch211
T211_PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12 $(PYTHON); do \
	$$p -c 'import sys' >/dev/null 2>&1 && { echo $$p; break; }; done)
T211_TESTS ?= tests/test_config.py tests/test_losses.py tests/test_models.py tests/test_engine_config.py \
	tests/test_bench.py tests/test_compile.py tests/test_feature_cache.py tests/test_gpu_cuda.py tests/test_gpu_check.py

setup-torch211: $(T211)/.installed

$(T211)/.installed: requirements/torch211.txt requirements/lock.txt setup.py | $(STAMP)
	$(T211_PYTHON) -m venv $(T211)
	$(T211)/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/torch211.txt wheel "setuptools<82"
	ln -sfn $$(cd $$(dirname $$(echo $(VENV)/lib/python3*/site-packages/nvidia)) && pwd)/nvidia \
		$$(echo $(T211)/lib/python3*/site-packages)/nvidia
	grep -viE '^(torch|torchvision|triton|nvidia-|cuda-)' requirements/lock.txt > $(T211)/lock-no-torch.txt
	DS_BUILD_OPS=0 $(T211)/bin/python -m pip install -q --disable-pip-version-check --no-deps \
		--no-build-isolation -r $(T211)/lock-no-torch.txt
	$(T211)/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test-torch211: $(T211)/.installed
	$(T211)/bin/python -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])'
	$(T211)/bin/python -m pytest -q $(T211_TESTS)

# The wheels the GPU machine lacks, into .whl/ (ignored; carried with `run`), and the CPU dry run of the check.
device-wheels: $(STAMP)
	$(PY) tools/prepare_device_wheels.py

gpu-check-dry-run: $(STAMP)
	tools/gpu_check.sh --dry-run runs/gpu_check_dry_run

