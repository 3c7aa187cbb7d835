# The vLLM worker image (VQA_VLLM_IMAGE), for GPU nodes: vLLM's own CUDA image (serves the model inside a GPU pod when
# no model service is configured, and the run-scoped model server) plus this package, installed with the pins resolved
# against vLLM 0.33.0 (constraints-worker.txt, `make constraints`). It cannot be built here (no GPU, no registry); its
# CPU variant, docker/worker-vllm-cpu.Dockerfile, is built and run by the tests. Build from the repository root:
#   docker build -f docker/worker-vllm.Dockerfile -t <registry>/vqa-worker-vllm:<tag> .
FROM vllm/vllm-openai:v0.33.0

# The pods' user (PodSettings.run_as_user). It gets a passwd entry, and USER and HOME are set: torch's
# cache set-up calls getpass.getuser(), which fails for a uid without either (pytorch#140765).
ARG VQA_UID=2000
RUN (getent group "${VQA_UID}" || groupadd --gid "${VQA_UID}" vqa) \
    && (getent passwd "${VQA_UID}" || useradd --uid "${VQA_UID}" --gid "${VQA_UID}" --no-create-home --home-dir /tmp --shell /usr/sbin/nologin vqa)

WORKDIR /opt/vqa
COPY constraints-worker.txt ./
COPY pyproject.toml README.md ./src/
COPY plugins/vqa_operators/ ./src/plugins/vqa_operators/
COPY include/ ./src/include/
# the package with its templates; the constraints keep vLLM's own pins (torch, transformers ...) where the base image has them
RUN python3 -m pip install --no-cache-dir -c constraints-worker.txt ./src

ENV HF_HOME=/models \
    HOME=/tmp \
    USER=vqa
USER ${VQA_UID}:${VQA_UID}
ENTRYPOINT ["python3", "-m", "vqa_operators"]
CMD ["--help"]
