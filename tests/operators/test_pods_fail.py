"""Slow tier: pods that fail, on the container tier, as a cluster would fail them; the operator's own code judges each.

- A Secret a pod reads does not exist: ``plan`` fails naming it, before any pod is made. Where
  Airflow's account may not read Secrets (plan says it could not check), the kubelet cannot create
  the pod's container (``CreateContainerConfigError``) and would retry for ever; the task fails on
  its first try, naming the Secret, and the pod is deleted.
- A pod over its memory limit: the kernel kills the worker (exit 137); the task says ``OOMKilled``
  and which memory to raise.
- A pod stopped with SIGTERM inside its grace period (an eviction, a spot node reclaimed): the
  worker checkpoints its finished rows and exits; Airflow's retry resumes from them and sends only
  the others.
- A model cache the pod's user cannot write (storage that ignores ``fsGroup``, owned by root): the
  worker refuses before it starts vLLM, naming the folder and the user.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from testkit.cluster import Claim
from testkit.data import make_jpeg, row_seeds
from testkit.openai_server import OpenAITestServer
from tests.airflow_env import AIRFLOW, ROOT, airflow
from tests.pod_tier import MODEL_CACHE, PodTier

pytestmark = pytest.mark.slow

BUCKET = "vqa-pods-fail"
ROWS = 12


@pytest.fixture(scope="module")
def inputs(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """image_qa's input on S3: ROWS rows of one image each; and the same rows on disk, for their request seeds."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    rows = [{"id": i, "image": f"img{i % 3}.jpg"} for i in range(ROWS)]
    for i in range(3):
        s3.put_object(Bucket=BUCKET, Key=f"media/img{i}.jpg", Body=make_jpeg((120 + 40 * i, 90)))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    s3.put_object(Bucket=BUCKET, Key="input/rows.jsonl", Body=text.encode())
    local = tmp_path_factory.mktemp("fail-input") / "rows.jsonl"
    local.write_text(text)
    return {"uri": f"s3://{BUCKET}/input/rows.jsonl", "local": local}


def conf(inputs: dict, **extra: object) -> str:
    return json.dumps(
        {
            "input_uri": inputs["uri"],
            "output_prefix": f"s3://{BUCKET}/output",
            "media_root": f"s3://{BUCKET}/media/",
            "seed": 5,
            "pairs_per_row": 1,
            "rows_per_shard": ROWS,
            **extra,
        }
    )


def task_tries(home: Path, dag_id: str, task_id: str) -> list[tuple[int, str]]:
    """(try number, state) of ``task_id`` in the last run of ``dag_id`` in ``home``'s database."""
    with sqlite3.connect(home / "airflow.db") as db:
        (run_id,) = db.execute("SELECT run_id FROM dag_run WHERE dag_id=? ORDER BY id DESC LIMIT 1", (dag_id,)).fetchone()
        return db.execute(
            "SELECT try_number, state FROM task_instance WHERE dag_id=? AND run_id=? AND task_id=?", (dag_id, run_id, task_id)
        ).fetchall()


def new_pods(pod_tier: PodTier, before: int, task_id: str) -> list[dict]:
    return [p for p in pod_tier.pods()[before:] if p["task_id"] == task_id]


def test_a_missing_secret_fails_plan_naming_it_before_any_pod(cluster_airflow: dict, pod_tier: PodTier, inputs: dict) -> None:
    before = len(pod_tier.pods())
    with pod_tier.without_secret("vqa-s3"):
        proc = airflow("dags", "test", "image_qa", "-c", conf(inputs), env=pod_tier.env(cluster_airflow["env"]), timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "the pods of this DAG read Secrets the namespace vqa lacks: Secret 'vqa-s3' (s3_secret) does not exist" in output, (
        output[-4000:]
    )
    assert task_tries(cluster_airflow["home"], "image_qa", "plan") == [(1, "failed")]
    assert pod_tier.pods()[before:] == [], "a pod was made"


def test_a_pod_whose_secret_is_missing_fails_at_once_naming_it(cluster_airflow: dict, pod_tier: PodTier, inputs: dict) -> None:
    """Where plan may not read Secrets (it says so and goes on), the pod meets the missing Secret: no 5-minute wait, no retry."""
    before = len(pod_tier.pods())
    with pod_tier.without_secret("vqa-s3"), pod_tier.forbidding("secrets"):
        proc = airflow("dags", "test", "image_qa", "-c", conf(inputs), env=pod_tier.env(cluster_airflow["env"]), timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "could not check the pods' Secrets in vqa (403" in output, output[-4000:]
    assert (
        'CreateContainerConfigError: Error: secret "vqa-s3" not found' in output
        or 'CreateContainerConfigError: secret "vqa-s3" not found' in output
    ), output[-4000:]
    assert "could not start" in output and "another try would fail the same way" in output, output[-4000:]
    # on its first try, without retries: the pod never started, and the operator deleted it rather than leave it waiting
    assert task_tries(cluster_airflow["home"], "image_qa", "generate") == [(1, "failed")]
    (pod,) = new_pods(pod_tier, before, "generate")
    assert pod["waiting"] == ["CreateContainerConfigError", 'secret "vqa-s3" not found'] and pod["exit_code"] is None
    assert pod["name"] not in pod_tier.namespace.running() and not (pod_tier.workdir / "pods" / pod["name"]).exists()


def test_a_pod_over_its_memory_limit_is_killed_and_the_task_says_so(
    cluster_airflow: dict, pod_tier: PodTier, inputs: dict, tmp_path: Path
) -> None:
    """The DAG's own file, with the generate task's memory set below what the worker needs (as a DAG author would, in Placement)."""
    dags = tmp_path / "dags"
    dags.mkdir()
    source = (ROOT / "dags" / "image_qa.py").read_text()
    assert "\nPODS = Placement()\n" in source and "    **DAG_DEFAULTS,\n" in source
    source = source.replace("\nPODS = Placement()\n", '\nPODS = Placement(tasks={"generate": {"memory": "48Mi"}})\n')
    # one retry is enough to show that a try after an OOM kill is Airflow's (the DAG's own three would only take longer)
    source = source.replace(
        "    **DAG_DEFAULTS,\n", '    **{**DAG_DEFAULTS, "default_args": {**DAG_DEFAULTS["default_args"], "retries": 1}},\n'
    )
    (dags / "image_qa.py").write_text(source)
    env = pod_tier.env({**cluster_airflow["env"], "AIRFLOW__CORE__DAGS_FOLDER": str(dags)})
    before = len(pod_tier.pods())
    proc = airflow("dags", "test", "image_qa", "-c", conf(inputs), env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "OOMKilled" in output and "pod's limit (48Mi)" in output and "Raise this task's memory" in output, output[-4000:]
    pods = new_pods(pod_tier, before, "generate")
    # every try was killed by the kernel at the limit, and retried (an OOM may be the try's, not the task's; the message says what to raise)
    assert pods and {p["exit_code"] for p in pods} == {137}
    assert [p["manifest"]["spec"]["containers"][0]["resources"]["limits"]["memory"] for p in pods] == ["48Mi"] * len(pods)
    assert [state for _, state in task_tries(cluster_airflow["home"], "image_qa", "generate")] == ["failed"]
    assert len(pods) == max(t for t, _ in task_tries(cluster_airflow["home"], "image_qa", "generate")) == 2
    # each failed pod was deleted once its log was in the task's (followed as it ran): none piles up in the namespace
    for pod in pods:
        assert pod["name"] not in pod_tier.namespace.running() and not (pod_tier.workdir / "pods" / pod["name"]).exists(), pod[
            "name"
        ]


def test_a_pod_stopped_with_sigterm_keeps_its_finished_rows_and_the_retry_resumes(
    vlm_server: OpenAITestServer, cluster_airflow: dict, pod_tier: PodTier, inputs: dict
) -> None:
    """The double answers the first half of the rows and holds the rest, so the stop lands mid-run whatever the machine's speed."""
    later = {seed for row, seed in row_seeds(inputs["local"], 5).items() if row >= ROWS // 2}
    vlm_server.hold(lambda body: body.get("seed") in later)
    before = len(pod_tier.pods())
    env = pod_tier.env(cluster_airflow["env"])
    run = subprocess.Popen(
        [AIRFLOW, "dags", "test", "image_qa", "-c", conf(inputs, quality_mode="annotate")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(run.stdout or []), daemon=True)
    reader.start()
    try:
        assert vlm_server.holding.wait(timeout=300), "the worker never reached the held rows"
        (name,) = [n for n in pod_tier.namespace.running() if n.startswith("vqa-image-qa-")]
        answered = len(vlm_server.requests)
        pod_tier.namespace.evict(name)  # SIGTERM; the worker has 30 s (the pod's grace period) before SIGKILL
        still_held = vlm_server.held
        vlm_server.release()
        run.wait(timeout=600)
        reader.join(timeout=60)
    finally:
        vlm_server.release()
        if run.poll() is None:
            run.kill()
    text = "".join(output)
    assert run.returncode == 0, text[-6000:]
    assert still_held >= 1 and answered >= ROWS // 2
    first, second = new_pods(pod_tier, before, "generate")
    # the worker stopped itself on SIGTERM inside the grace period (128 + 15), having saved what it had finished
    assert first["exit_code"] == 143 and first["try_number"] == "1", first["logs"][-2000:]
    assert "Interrupted: SIGTERM" in first["logs"] and "checkpointed, so the next try sends only the other rows" in first["logs"]
    assert second["exit_code"] == 0 and second["try_number"] == "2"
    manifest = next(json.loads(line) for line in reversed(second["logs"].splitlines()) if line.startswith('{"'))
    assert manifest["rows_reused"] == ROWS // 2 and manifest["requests"] == ROWS - ROWS // 2
    assert [state for _, state in task_tries(cluster_airflow["home"], "image_qa", "generate")] == ["success"]


def test_a_model_cache_the_pods_user_cannot_write_fails_at_once_naming_it(
    cluster_airflow: dict, pod_tier: PodTier, inputs: dict, tmp_path: Path
) -> None:
    """In-pod vLLM on a claim whose storage ignores fsGroup (NFS, EFS) and whose root is root's: refused before vLLM starts."""
    env = pod_tier.env(cluster_airflow["env"])
    # no model service: each worker pod starts vLLM on the model the connection names, from the model cache
    env["AIRFLOW_CONN_VQA_VLM"] = json.dumps({"conn_type": "http", "password": "x", "extra": {"model": "/models/tiny"}})
    nfs = Claim(path=str(tmp_path / "nfs-root"), uid=0, gid=0, mode=0o755, supports_fs_group=False)
    before = len(pod_tier.pods())
    with pod_tier.with_claim(MODEL_CACHE, nfs):
        proc = airflow("dags", "test", "image_qa", "-c", conf(inputs), env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "the model cache /models (HF_HOME) is not writable by uid 2000" in output and "owned by 0:0 with mode 755" in output, (
        output[-4000:]
    )
    (pod,) = new_pods(pod_tier, before, "generate")
    assert pod["exit_code"] == 2 and "--serve-vllm" in pod["manifest"]["spec"]["containers"][0]["args"]
    assert "starting model server" not in pod["logs"]
    assert task_tries(cluster_airflow["home"], "image_qa", "generate") == [(1, "failed")]
