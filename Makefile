# The README's two commands: `make demo` (set up + main job) and `make test` (set up + test suite).
# Each creates .venv on first use and installs the pinned, tested set of packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test clean setup-device test-device device-wheels gpu-check-dry-run

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

# The lent GPU machine's stack, rehearsed on the CPU (.ci/run runs it): Python 3.12 (the carried wheels' own) with
# only the packages that machine has (requirements/device.txt: torch 2.11, its huggingface_hub, ...); deepspeed,
# webdataset, submitit, fairscale, pydantic and timm come from the carried .whl/ folder, installed the way
# tools/gpu_check.sh installs them there. Then the check's own dry run (its GPU test subset included) and a fast
# subset of the suite. PyPI has only the CUDA build of torch 2.11: its CUDA libraries (same cu13 sonames) are
# linked from .venv instead of downloaded again (3.2 GB): loaded at import, never used on the CPU.
DEVICE_VENV ?= .venv-device
DEVICE_PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys' >/dev/null 2>&1 && { echo $$p; break; }; done)
DEVICE_SITE := $(abspath $(DEVICE_VENV))/carried
DEVICE_TESTS ?= tests/test_config.py tests/test_losses.py tests/test_models.py tests/test_engine_config.py \
	tests/test_bench.py tests/test_compile.py tests/test_feature_cache.py tests/test_checkpoint.py \
	tests/test_pretrained_hub_cache.py tests/test_pipeline.py tests/test_zero_stages.py tests/test_bf16_gradients.py

setup-device: $(DEVICE_VENV)/.installed

# pip resolves the dependencies of installed packages too: torch and the two packages that require it (torchvision,
# timm) go in with --no-deps, so that it never fetches torch's CUDA libraries (or triton, which the CPU never uses).
$(DEVICE_VENV)/.installed: requirements/device.txt requirements/lock.txt | $(STAMP)
	@test -n "$(DEVICE_PYTHON)" || { echo "make setup-device: no Python 3.12 found (set DEVICE_PYTHON=...)"; exit 1; }
	$(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	ln -sfn $$(cd $$(dirname $$(echo $(VENV)/lib/python3*/site-packages/nvidia)) && pwd)/nvidia \
		$$(echo $(DEVICE_VENV)/lib/python3*/site-packages)/nvidia
	grep -viE '^(torch|torchvision|triton|nvidia-|cuda-|huggingface.hub)==' requirements/lock.txt \
		> $(DEVICE_VENV)/constraints.txt
	$(DEVICE_VENV)/bin/python -m pip install -q --disable-pip-version-check -c $(DEVICE_VENV)/constraints.txt \
		$$(grep -vE '^(#|torch==|torchvision==|timm$$)' requirements/device.txt)
	$(DEVICE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps \
		$$(grep -E '^(torch|torchvision)==' requirements/device.txt) $$(grep -E '^timm==' requirements/lock.txt)
	touch $@

test-device: $(DEVICE_VENV)/.installed device-wheels
	rm -rf $(DEVICE_SITE)
	GPU_CHECK_PYTHON=$(DEVICE_VENV)/bin/python GPU_CHECK_SITE=$(DEVICE_SITE) \
		tools/gpu_check.sh --dry-run runs/gpu_check_device_rehearsal
	PYTHONPATH=$(CURDIR):$(DEVICE_SITE) HF_HUB_OFFLINE=1 $(DEVICE_VENV)/bin/python -m pytest -q -p no:cacheprovider $(DEVICE_TESTS)

# The wheels the GPU machine lacks, into .whl/ (ignored; carried with `run`), and the CPU dry run of the check.
device-wheels: $(STAMP)
	$(PY) tools/prepare_device_wheels.py

gpu-check-dry-run: $(STAMP)
	tools/gpu_check.sh --dry-run runs/gpu_check_dry_run

