"""Slow tier: the install's smoke test (``vqa_smoke``) on the container tier, and the RBAC the kit grants, derived from the calls.

``vqa_smoke`` is what a platform team runs on its own cluster before it hands the DAGs to users.
Here it runs through ``airflow dags test`` in kubernetes mode against the pod tier: one pod per
topology from the images built from our Dockerfiles (the worker image calling the model service;
the vLLM image on the GPU node, with the model cache), each checking its user, its read-only root,
the data root, the model server, the cache and the GPU; then image_qa's tasks on a 4-row sample.
No GPU device exists here: the GPU pod is placed on the GPU node by its request and reports the
missing device, which ``expect_gpu`` off makes a SKIP rather than a FAIL.

The Role in ``deploy/rbac.yaml`` (``scripts/deploy_kit.RULES``) must be exactly what the
components call: the calls the tier answered (pods, their logs, exec, events, plan's Secret
check), the run server's lifecycle against the recorded API (``testkit.kube_api``), and the one
call only the triggerer makes (a watch on events, which no test here runs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from testkit.openai_server import OpenAITestServer
from tests.airflow_env import airflow
from tests.pod_tier import API_KEY, PodTier

pytestmark = pytest.mark.slow

BUCKET = "vqa-smoke-data"
# what the triggerer's deferred wait calls and nothing here runs: AsyncKubernetesHook.watch_pod_events watches a pod's events
TRIGGERER_ONLY = {("", "events", "watch")}


@pytest.fixture(scope="module")
def smoke_run(_vlm_server: OpenAITestServer, s3_endpoint: str, cluster_airflow: dict, pod_tier: PodTier) -> Iterator[dict]:
    import boto3

    vlm_server = _vlm_server
    vlm_server.reset()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    vlm_server.required_key = API_KEY
    root = f"s3://{BUCKET}"
    env = pod_tier.env(
        {
            **cluster_airflow["env"],
            "VQA_DATA_ROOT": root,
            "VQA_ALLOWED_INPUT_ROOTS": f"{root}/raw",
            "VQA_ALLOWED_OUTPUT_ROOTS": f"{root}/output",
            "VQA_ALLOWED_MEDIA_ROOTS": f"{root}/",
        }
    )
    before = len(pod_tier.pods())
    proc = airflow("dags", "test", "vqa_smoke", "-c", json.dumps({"expect_gpu": False}), env=env, timeout=900)
    yield {"proc": proc, "output": proc.stdout + proc.stderr, "pods": pod_tier.pods()[before:], "s3": s3}
    vlm_server.reset()


def test_the_smoke_test_passes_on_the_container_tier_with_a_verdict_per_check(smoke_run: dict) -> None:
    output = smoke_run["output"]
    assert smoke_run["proc"].returncode == 0, output[-6000:]
    verdicts = {
        check: mark for mark, check in re.findall(r"(PASS|FAIL|SKIP) ((?:cpu_pod|gpu_pod) [a-z -]+|image_qa estimate):", output)
    }
    assert verdicts == {
        "cpu_pod user": "PASS",
        "cpu_pod read-only root": "PASS",
        "cpu_pod data root": "PASS",
        "cpu_pod model server": "PASS",
        "gpu_pod user": "PASS",
        "gpu_pod read-only root": "PASS",
        "gpu_pod data root": "PASS",
        "gpu_pod model server": "PASS",
        "gpu_pod model cache": "PASS",
        "gpu_pod gpu": "SKIP",
        "image_qa estimate": "PASS",
    }, output[-6000:]
    assert "the smoke test passed" in output
    # the GPU's absence is said plainly: no device was given (the tier has none), and expect_gpu was off
    assert re.search(
        r"SKIP gpu_pod gpu: not required \(expect_gpu is off\): .*1 GPU\(s\) requested, 0 device\(s\) in /dev", output
    ), output[-4000:]
    assert re.search(r"PASS image_qa estimate: 4 rows in, \d+ out, 0 failed", output), output[-4000:]
    # the probes were deleted; the sample stays for the next run (the same bytes)
    keys = [
        o["Key"] for o in smoke_run["s3"].list_objects_v2(Bucket=BUCKET, Prefix="output/vqa_smoke/smoke/").get("Contents", [])
    ]
    assert keys == []


def test_each_smoke_pod_is_placed_and_locked_down_as_its_topology(smoke_run: dict) -> None:
    pods = {p["task_id"]: p for p in smoke_run["pods"]}
    assert {"cpu_pod", "gpu_pod", "generate", "quality"} <= set(pods)
    cpu, gpu = pods["cpu_pod"], pods["gpu_pod"]
    assert cpu["exit_code"] == gpu["exit_code"] == 0
    assert cpu["node"] == "cpu-1" and gpu["node"] == "gpu-1"
    assert "registry.example/vqa-worker:" in cpu["manifest"]["spec"]["containers"][0]["image"]
    assert "registry.example/vqa-worker-vllm:" in gpu["manifest"]["spec"]["containers"][0]["image"]
    for pod in pods.values():
        spec = pod["manifest"]["spec"]
        assert spec["securityContext"]["runAsUser"] == 2000 and spec["enableServiceLinks"] is False
        assert spec.get("activeDeadlineSeconds") or pod["task_id"] in ("cpu_pod", "gpu_pod")
    # the worker pods have a deadline from their shard (4 rows: 3600 + 4 x 5 s)
    assert pods["generate"]["manifest"]["spec"]["activeDeadlineSeconds"] == 3620


def test_the_role_is_exactly_what_the_components_call(
    smoke_run: dict, pod_tier: PodTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scripts.deploy_kit import RULES
    from tests.operators.test_run_server_api import run_server_lifecycle

    granted = {(group, resource, verb) for group, resource, verbs, _ in RULES for verb in verbs}
    tier = pod_tier.namespace.calls()
    server = run_server_lifecycle(monkeypatch)
    called = tier | server | TRIGGERER_ONLY
    assert called - granted == set(), "the operators call what the Role does not grant: a cluster answers 403"
    assert granted - called == set(), "the Role grants what no component calls"
    # the pods' part comes from the tier's answers, the run server's from the recorded API: neither is a hand-kept list
    assert (
        ("", "secrets", "get") in tier
        and ("", "pods/exec", "create") in tier
        and ("apps", "deployments/scale", "patch") in server
    )
