"""Kubernetes mode: the worker pod is built without a cluster and validated against the Kubernetes schema."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/vqa-pod-test")

from tests.conftest import MODEL  # noqa: E402

SECRET_KEY = "sk-must-not-appear"


@pytest.fixture
def vlm_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_VQA_VLM",
        json.dumps({"conn_type": "http", "host": "http://vllm.vqa.svc:8000/v1", "password": SECRET_KEY, "extra": {"model": MODEL}}),
    )


def build_manifest(monkeypatch: pytest.MonkeyPatch) -> dict:
    from kubernetes.client import ApiClient

    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    monkeypatch.setenv("VQA_WORKER_IMAGE", "registry.example/vqa-worker:1.0")
    dag = DagBag(dag_folder=os.path.join(os.path.dirname(__file__), "..", "dags")).dags["image_qa"]
    task = dag.get_task("generate")
    context = {
        "params": {"input_uri": "s3://in/rows.jsonl", "output_prefix": "s3://out/prefix", "media_root": "s3://in/", "pairs_per_row": 4, "seed": 9},
        "dag": dag,
        "task": task,
        "run_id": "manual__2026-11-21T00:00:00+00:00",
        "ti": SimpleNamespace(dag_id="image_qa", task_id="generate", map_index=-1, try_number=1),
    }
    task.render_template_fields(context)
    pod = task.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def test_pod_is_valid_and_runs_the_worker_on_a_gpu(vlm_connection, monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate

    manifest = build_manifest(monkeypatch)
    kubernetes_validate.validate(manifest, "1.33", strict=True)
    container = manifest["spec"]["containers"][0]
    assert container["image"] == "registry.example/vqa-worker:1.0"
    assert container["command"] == ["python3", "-m", "vqa_operators"]
    args = container["args"]
    assert args[:6] == ["run", "image_qa", "--input", "s3://in/rows.jsonl", "--output", "s3://out/prefix/image_qa/manual__2026-11-21T00:00:00+00:00/generate.jsonl"]
    assert ["--param", "pairs_per_row=4"] == args[args.index("--param") : args.index("--param") + 2]
    assert "--serve-vllm" not in args  # an existing service URL is configured
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    spec = manifest["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "vqa-model-cache"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["VQA_BASE_URL"]["value"] == "http://vllm.vqa.svc:8000/v1"
    assert env["VQA_MODEL"]["value"] == MODEL
    assert env["VQA_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vqa-vlm", "key": "api-key"}
    assert container["envFrom"] == [{"secretRef": {"name": "vqa-s3"}}]
    assert SECRET_KEY not in json.dumps(manifest)


def test_without_a_service_url_vllm_runs_in_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate

    monkeypatch.delenv("AIRFLOW_CONN_VQA_VLM", raising=False)
    monkeypatch.delenv("VQA_BASE_URL", raising=False)
    monkeypatch.setenv("VQA_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    manifest = build_manifest(monkeypatch)
    kubernetes_validate.validate(manifest, "1.33", strict=True)
    container = manifest["spec"]["containers"][0]
    assert container["args"][-1] == "--serve-vllm"
    assert {e["name"]: e.get("value") for e in container["env"]}["VQA_MODEL"] == "Qwen/Qwen2.5-VL-7B-Instruct"
