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

ROOT = Path(__file__).resolve().parents[2]
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
    assert (
        json.loads(connections["AIRFLOW_CONN_VQA_VLM"])["conn_type"] == "http"
        and json.loads(connections["AIRFLOW_CONN_AWS_DEFAULT"])["conn_type"] == "aws"
    )


def test_the_rbac_is_the_kits_rules_bound_to_every_component_of_the_release() -> None:
    """What the Role grants is ``deploy_kit.RULES``, which the tests derive from the components' calls (test_smoke, test_run_server_api)."""
    from scripts.deploy_kit import RBAC, RULES, render_rbac

    assert RBAC.read_text() == render_rbac(), "deploy/rbac.yaml is stale: run `.venv/bin/python scripts/deploy_kit.py`"
    role = next(o for o in objects() if o["kind"] == "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {(group, resource, verb) for group, resource, verbs, _ in RULES for verb in verbs}
    # Secrets: get only, and only the ones the pods read by default
    (secrets,) = [rule for rule in role["rules"] if rule["resources"] == ["secrets"]]
    assert secrets["verbs"] == ["get"] and set(secrets["resourceNames"]) >= {"vqa-vlm", "vqa-s3"}
    binding = next(o for o in objects() if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # the workers and the scheduler run tasks; the triggerer waits for deferred pods (without it, deferrable mode gets 403)
    assert [s["name"] for s in binding["subjects"]] == ["airflow-worker", "airflow-scheduler", "airflow-triggerer"]
    other = [doc for doc in yaml.safe_load_all(render_rbac("data-team", "orchestration")) if doc["kind"] == "RoleBinding"][0]
    assert {(s["name"], s["namespace"]) for s in other["subjects"]} == {
        ("data-team-worker", "orchestration"),
        ("data-team-scheduler", "orchestration"),
        ("data-team-triggerer", "orchestration"),
    }


def test_the_model_cache_claim_names_a_storage_class_and_no_pod_that_calls_a_service_mounts_it() -> None:
    claim = next(o for o in objects() if o["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"]


def test_no_service_of_the_kit_gives_vllm_a_variable_it_refuses() -> None:
    """A Service named ``vllm`` makes the kubelet put ``VLLM_PORT=tcp://...`` into later pods (where links are on), which vLLM refuses."""
    import json

    connections = next(o for o in objects() if o["kind"] == "Secret" and o["metadata"]["name"] == "vqa-airflow-connections")[
        "stringData"
    ]
    host = json.loads(connections["AIRFLOW_CONN_VQA_VLM"])["host"]
    service = host.split("//", 1)[1].split(".", 1)[0]
    assert not service.upper().replace("-", "_").startswith("VLLM"), host
    names = [o["metadata"]["name"] for o in objects() if o["kind"] == "Service"]
    assert not any(name.upper().replace("-", "_").startswith("VLLM") for name in names)


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
