# Two commands matter: `make demo` (the whole pipeline on one machine) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
PY := $(VENV)/bin/python
UV := $(PYTHON) -m uv
# torch's CPU build: the wheel on this machine if there is one, else PyTorch's CPU index
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
CHROMIUM := /usr/bin/chromium

.PHONY: venv test test-fast demo lint bench bench-faults constraints clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) $(TORCH_SOURCE) -r requirements-dev.txt -c constraints.txt
	touch $@

$(CHROMIUM):  ## Debian's chromium for the browser tests (Playwright drives it; it never downloads a browser)
	apt-get install -y -qq chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

venv: $(VENV)/.installed  ## create .venv with uv from the pinned constraints

test: venv $(CHROMIUM)  ## the whole suite: fast tier and slow tier (Airflow end to end, browser)
	$(PY) -m pytest -m "slow or not slow"

test-fast: venv  ## the fast tier only (the default of a bare `pytest`)
	$(PY) -m pytest

demo: venv  ## embedded S3 + Airflow standalone + image_qa on generated samples; needs VQA_BASE_URL
	$(PY) scripts/demo.py

lint: venv
	$(VENV)/bin/hadolint Dockerfile docker/worker.Dockerfile

bench: venv  ## every performance measure side by side: saturation, video critical path, memory, image preparation, parse time, fan-out
	cd bench && ../$(PY) run.py

bench-faults: venv  ## rows accounted for under model-server fault mixes; calls saved on resume
	$(PY) bench/faults.py

constraints: venv  ## re-pin every package after changing a requirements file
	$(UV) pip install --quiet --python $(PY) $(TORCH_SOURCE) -r requirements-dev.txt
	$(UV) pip freeze --python $(PY) | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) .demo .pytest_cache
