"""The deployment kit (``deploy/``): every manifest validates against Kubernetes' schema, and it agrees with the code.

No cluster runs here: what is checked is that each object is well formed for Kubernetes 1.33, that
the names the code uses by default (Secrets, keys, the model cache's claim, the namespace) exist in
the kit, that the RBAC covers what the operators ask of the API, that the Helm values set only real
settings, and that the run-scoped server's reference manifests are what the setup task builds.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("AIRFLOW_HOME", "/tmp/vqa-deploy-test")

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "deploy"
MANIFESTS = sorted(p for p in KIT.glob("*.yaml"))


def objects() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_of_the_kit_validates(path: Path) -> None:
    import kubernetes_validate

    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_the_kit_holds_what_the_pods_reference_by_default() -> None:
    from vqa_operators.operators.placement import PodSettings

    kinds = {(o["kind"], o["metadata"]["name"]): o for o in objects()}
    defaults = PodSettings(namespace="vqa")
    secret = kinds[("Secret", defaults.api_key_secret)]
    assert defaults.api_key_secret_key in secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(kinds[("Secret", defaults.s3_secret)]["stringData"])
    assert kinds[("PersistentVolumeClaim", defaults.model_cache_claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert ("Namespace", "vqa") in kinds and ("ServiceAccount", "vqa-worker") in kinds
    # the connections the chart's components read, as JSON Airflow parses
    import json

    connections = kinds[("Secret", "vqa-airflow-connections")]["stringData"]
    assert json.loads(connections["AIRFLOW_CONN_VQA_VLM"])["conn_type"] == "http" and json.loads(connections["AIRFLOW_CONN_AWS_DEFAULT"])["conn_type"] == "aws"


def test_the_role_covers_what_the_operators_ask_of_the_api() -> None:
    role = next(o for o in objects() if o["kind"] == "Role")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}
    # KubernetesPodOperator: create, watch, logs, the XCom sidecar through exec, delete, label as checked, events on failure;
    # the run-scoped server: a Deployment and a Service, created and deleted
    needed = {
        ("", "pods", "create"), ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "patch"), ("", "pods", "delete"),
        ("", "pods/log", "get"), ("", "pods/exec", "create"), ("", "events", "list"),
        ("apps", "deployments", "create"), ("apps", "deployments", "delete"), ("", "services", "create"), ("", "services", "delete"),
    }
    assert needed <= granted, needed - granted
    binding = next(o for o in objects() if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_the_helm_values_set_only_real_settings_and_the_kubernetes_mode() -> None:
    from vqa_operators import settings

    values = yaml.safe_load((KIT / "helm" / "values.yaml").read_text())
    env = {e["name"]: e["value"] for e in values["env"]}
    assert set(env) <= set(settings.variables()), set(env) - set(settings.variables())
    assert env["VQA_EXECUTION"] == "kubernetes" and values["airflowVersion"] == "3.3.2"
    # the values parse as the deployment would read them
    for name, value in env.items():
        os.environ[name] = value
    try:
        parsed = settings.environment()
    finally:
        for name in env:
            del os.environ[name]
    assert parsed.execution == "kubernetes" and parsed.allowed_input_roots == ["s3://acme-vqa/raw"]
    assert shlex.split(env["VQA_VLLM_ARGS"])[-1] == '{"image": 16}'  # the JSON survives the shell-style split
    # the chart's airflow_local_settings would shadow the image's own
    assert values["airflowLocalSettings"] is None
    assert "vqa-airflow-connections" in values["extraEnvFrom"]


def test_the_run_server_reference_is_what_the_setup_task_builds() -> None:
    from scripts.deploy_kit import KIT as REFERENCE
    from scripts.deploy_kit import render

    assert REFERENCE.read_text() == render(), "deploy/run-server.yaml is stale: run `.venv/bin/python scripts/deploy_kit.py`"
