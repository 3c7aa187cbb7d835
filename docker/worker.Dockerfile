# The worker image (VQA_WORKER_IMAGE): this package and its runtime dependencies, nothing else (no vLLM, no torch, no
# CUDA). It runs every worker pod that calls a model service (the vqa_vlm connection's host, or the run's own server),
# and it is the base of the CPU vLLM image (docker/worker-vllm-cpu.Dockerfile). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t <registry>/vqa-worker:<tag> .
# BASE is any Debian-like image with Python 3.11 and its venv module; CI builds on one made from Debian's packages.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# an image made from a root file system (podman import) carries no PATH of its own
ENV PATH=/opt/vqa/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The pods' user (PodSettings.run_as_user). It gets a passwd entry, and USER and HOME are set: torch's
# cache set-up calls getpass.getuser(), which fails for a uid without either (pytorch#140765).
ARG VQA_UID=2000
RUN (getent group "${VQA_UID}" || groupadd --gid "${VQA_UID}" vqa) \
    && (getent passwd "${VQA_UID}" || useradd --uid "${VQA_UID}" --gid "${VQA_UID}" --no-create-home --home-dir /tmp --shell /usr/sbin/nologin vqa)

# the package with its templates, at the versions the tests run with (the vLLM CPU environment's pins, which hold
# every package this one needs), in a venv that keeps nothing else: the venv's own pip and setuptools go once they
# have installed it, and so do the sources
COPY constraints-vllm.txt /opt/vqa/constraints.txt
COPY pyproject.toml README.md /opt/vqa/src/
COPY plugins/vqa_operators/ /opt/vqa/src/plugins/vqa_operators/
COPY include/ /opt/vqa/src/include/
RUN python3 -m venv /opt/vqa/venv \
    && /opt/vqa/venv/bin/python3 -m pip install --no-cache-dir -c /opt/vqa/constraints.txt /opt/vqa/src \
    && /opt/vqa/venv/bin/python3 -m pip uninstall --yes setuptools pip \
    && rm -rf /opt/vqa/src \
    && mkdir -p /opt/vqa/work

# a folder of its own to start in, made by a RUN so that it exists in the image (a read-only root cannot create it)
WORKDIR /opt/vqa/work
ENV HF_HOME=/models \
    HOME=/tmp \
    USER=vqa
USER ${VQA_UID}:${VQA_UID}
ENTRYPOINT ["python3", "-m", "vqa_operators"]
CMD ["--help"]
