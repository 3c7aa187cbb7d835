# The GPU worker image: vLLM (serves the model inside the pod when no service URL is configured)
# plus this package's worker CLI. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t <registry>/vqa-worker:<tag> .
FROM vllm/vllm-openai:v0.33.0

WORKDIR /opt/vqa
COPY requirements-worker.txt ./
RUN pip install --no-cache-dir -r requirements-worker.txt

COPY plugins/vqa_operators/ /opt/vqa/plugins/vqa_operators/
COPY include/prompts/ /opt/vqa/include/prompts/
ENV PYTHONPATH=/opt/vqa/plugins \
    VQA_PROMPTS_DIR=/opt/vqa/include/prompts \
    HF_HOME=/models \
    HOME=/tmp

USER 1000:1000
ENTRYPOINT ["python3", "-m", "vqa_operators"]
CMD ["--help"]
