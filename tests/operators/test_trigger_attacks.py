"""Slow tier: what a user who may only trigger runs tries, through ``airflow dags test`` of the real DAGs, in both modes.

Every attack runs in local mode and in kubernetes mode, where the worker pods go through the pod
tier with the kubelet's ``$(VAR)`` expansion applied (``tests/pod_tier.py``).

- Templates, paths outside the roots, traversal: each fails in ``plan``, on its first try, before a
  byte is read or written.
- A param naming a Secret of the pods' environment (``$(VQA_API_KEY)``, ``$(AWS_SECRET_ACCESS_KEY)``)
  is text: the run holds the text as typed, in both modes, and the two give the same dataset.

Neither the deployment's secrets (the ``vqa_vlm`` connection's API key, the ``vqa-vlm`` and
``vqa-s3`` Secrets' values, an Airflow Variable) nor a line of a private file on the worker appears
in any log, in the Airflow database or in any object (outputs, errors, preview, exports).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testkit.data import make_jpeg
from testkit.openai_server import OpenAITestServer
from tests.airflow_env import airflow, in_home
from tests.pod_tier import API_KEY, AWS_SECRET, PodTier

pytestmark = pytest.mark.slow

CONN_AWS_SECRET = "testing-secret-value"  # airflow_env's aws_default password: local mode's S3 secret key
VARIABLE = "var-secret-9c41e7-never-print"
PRIVATE = ["PRIVATE-LINE-1 root:x:0:0", '{"image": "PRIVATE-LINE-2.jpg"}', "PRIVATE-LINE-3 token=abc"]
SECRETS = (API_KEY, AWS_SECRET, CONN_AWS_SECRET, VARIABLE, *PRIVATE)
MODES = ("local", "kubernetes")
KEY_REF, S3_REF = "$(VQA_API_KEY)", "$(AWS_SECRET_ACCESS_KEY)"


def plan_attacks(bucket: str, other: str, allowed: Path, private: Path, evil_out: Path) -> dict[str, tuple[str, dict, str]]:
    """name -> (dag_id, conf, the rule plan's message names)."""
    base = {
        "input_uri": f"s3://{bucket}/input/rows.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/",
    }
    return {
        "template naming conn": (
            "image_qa",
            {**base, "input_uri": f"s3://{bucket}/input/{{{{ conn.vqa_vlm.password }}}}.jsonl"},
            "param input_uri holds a template",
        ),
        "template naming var": (
            "pers_qa",
            {**base, "input_uri": f"s3://{bucket}/input/{{{{ var.value.vqa_note }}}}.jsonl"},
            "param input_uri holds a template",
        ),
        "local file outside the roots": (
            "video_qa",
            {**base, "input_uri": str(private)},
            "param input_uri lies outside the allowed roots",
        ),
        "traversal": (
            "image_qa",
            {**base, "input_uri": f"{allowed}/../private/secrets.jsonl"},
            "param input_uri has a '.' or '..' segment",
        ),
        "symlink": (
            "pers_qa",
            {**base, "input_uri": str(allowed / "link.jsonl")},
            "param input_uri lies outside the allowed roots",
        ),
        "another bucket": (
            "video_qa",
            {**base, "input_uri": f"s3://{other}/input/rows.jsonl"},
            "param input_uri lies outside the allowed roots",
        ),
        "local output path": (
            "image_qa",
            {**base, "output_prefix": str(evil_out)},
            "param output_prefix lies outside the allowed roots",
        ),
    }


def reference_attacks(bucket: str) -> dict[str, tuple[str, dict, bool]]:
    """name -> (dag_id, conf, whether the run succeeds): params naming the pods' Secrets, each reaching a pod's args."""
    base = {
        "input_uri": f"s3://{bucket}/input/rows.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/media/",
        "seed": 3,
    }
    return {
        # the tag starts every answer; the input, output and media locations name folders that hold the references as text
        "tag and locations": (
            "pers_qa",
            {
                **base,
                "tag": KEY_REF,
                "input_uri": f"s3://{bucket}/input/{S3_REF}/rows.jsonl",
                "output_prefix": f"s3://{bucket}/output/{S3_REF}",
                "media_root": f"s3://{bucket}/media/{KEY_REF}/",
            },
            True,
        ),
        "tag naming the S3 key": ("pers_qa", {**base, "tag": S3_REF}, True),
        # the model server does not serve it, and the worker's message quotes the name it was given
        "model naming the S3 key": ("image_qa", {**base, "model": S3_REF}, False),
        "model naming the API key": ("image_qa", {**base, "model": KEY_REF}, False),
    }


@pytest.fixture(scope="module")
def attack_env(tmp_path_factory: pytest.TempPathFactory, cluster_airflow: dict) -> dict:
    """The container tier's Airflow (its servers at this machine's address, for both modes), with the roots and a Variable set.

    Each run copies its database (two may run at once on SQLite).
    """
    suffix = uuid.uuid4().hex[:8]
    bucket, other = f"vqa-attacks-{suffix}", f"vqa-other-team-{suffix}"
    root = tmp_path_factory.mktemp("attacks")
    allowed = root / "allowed"
    env = dict(cluster_airflow["env"])
    env.update(
        {
            "AIRFLOW_VAR_VQA_NOTE": VARIABLE,
            "VQA_ALLOWED_INPUT_ROOTS": f"s3://{bucket}/input,{allowed}",
            "VQA_ALLOWED_OUTPUT_ROOTS": f"s3://{bucket}/output",
            "VQA_ALLOWED_MEDIA_ROOTS": f"s3://{bucket}/media",
        }
    )
    return {"env": env, "db": cluster_airflow["pristine"], "root": root, "allowed": allowed, "bucket": bucket, "other": other}


def run_all(runs: list[tuple[str, str, dict, dict]], attack_env: dict) -> dict[str, tuple[int, str, Path]]:
    """Each ``(name, dag_id, conf, env)`` through ``airflow dags test`` in a home of its own, two at a time: name -> (exit code, output, home)."""

    def run(item: tuple[int, tuple[str, str, dict, dict]]) -> tuple[str, tuple[int, str, Path]]:
        index, (name, dag_id, conf, env) = item
        run_home = attack_env["root"] / f"home-{uuid.uuid4().hex[:8]}-{index}"
        run_home.mkdir()
        shutil.copy(attack_env["db"], run_home / "airflow.db")
        proc = airflow("dags", "test", dag_id, "-c", json.dumps(conf), env=in_home(env, run_home), timeout=900)
        return name, (proc.returncode, proc.stdout + proc.stderr, run_home)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, enumerate(runs)))


def stored(run_home: Path) -> str:
    """Everything a run left in Airflow: its task logs and the rows of the tables that hold what tasks said."""
    logs = "\n".join(p.read_text(errors="replace") for p in (run_home / "logs").rglob("*") if p.is_file())
    with sqlite3.connect(run_home / "airflow.db") as db:
        rows = "\n".join(
            str(row) for table in ("xcom", "log", "task_instance", "dag_run") for row in db.execute(f"SELECT * FROM {table}")
        )
    return logs + rows


def every_object(s3) -> str:
    everywhere = [
        (b["Name"], o["Key"])
        for b in s3.list_buckets()["Buckets"]
        for o in s3.list_objects_v2(Bucket=b["Name"]).get("Contents", [])
    ]
    return "\n".join(
        key + "\n" + s3.get_object(Bucket=name, Key=key)["Body"].read().decode("utf-8", "replace") for name, key in everywhere
    )


@pytest.mark.parametrize("mode", MODES)
def test_each_plan_attack_fails_in_plan_and_leaks_nothing(
    _vlm_server, s3, attack_env: dict, pod_tier: PodTier, mode: str
) -> None:
    bucket, other, root, allowed = attack_env["bucket"], attack_env["other"], attack_env["root"] / mode, attack_env["allowed"]
    for name in (bucket, other):
        if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket=name)
    rows = "".join(json.dumps({"image": "a.jpg"}) + "\n" for _ in range(3))
    s3.put_object(Bucket=bucket, Key="media/a.jpg", Body=make_jpeg((64, 64)))
    s3.put_object(Bucket=bucket, Key="input/rows.jsonl", Body=rows.encode())
    s3.put_object(Bucket=other, Key="input/rows.jsonl", Body=rows.encode())  # readable with the deployment's credentials
    # a private file on the worker, an allowed local folder beside it, and a symlink in that folder pointing at the file
    (root / "private").mkdir(parents=True)
    private = root / "private" / "secrets.jsonl"
    private.write_text("\n".join(PRIVATE) + "\n")
    allowed.mkdir(exist_ok=True)
    (allowed / "link.jsonl").unlink(missing_ok=True)
    (allowed / "link.jsonl").symlink_to(private)
    evil_out = root / "evil-out"
    before = sorted((b, o["Key"]) for b in (bucket, other) for o in s3.list_objects_v2(Bucket=b).get("Contents", []))

    env = pod_tier.env(attack_env["env"]) if mode == "kubernetes" else attack_env["env"]
    pods_before = len(pod_tier.pods())
    cases = plan_attacks(bucket, other, allowed, private, evil_out)
    results = run_all([(name, dag_id, conf, env) for name, (dag_id, conf, _) in cases.items()], attack_env)

    for name, (code, output, run_home) in results.items():
        dag_id, _, rule = cases[name]
        assert code != 0, f"{name}: the run succeeded"
        with sqlite3.connect(run_home / "airflow.db") as db:
            instances = db.execute("SELECT task_id, try_number, state FROM task_instance WHERE dag_id=?", (dag_id,)).fetchall()
        tries = {task_id: (try_number, state) for task_id, try_number, state in instances}
        # plan failed on its first try, not retried; nothing after it ran, so no pod was made
        assert tries["plan"] == (1, "failed"), (name, tries)
        assert all(state in ("upstream_failed", None) for task, (_, state) in tries.items() if task != "plan"), (name, tries)
        assert f"invalid parameters: {rule}" in output, (name, output[-3000:])
        logs = output + stored(run_home)
        for secret in SECRETS:
            assert secret not in logs, (name, secret)

    # nothing was written: no object under any output prefix, no local output folder; and no object anywhere holds a secret
    assert sorted((b, o["Key"]) for b in (bucket, other) for o in s3.list_objects_v2(Bucket=b).get("Contents", [])) == before
    assert not evil_out.exists()
    assert len(pod_tier.pods()) == pods_before
    objects = every_object(s3)
    for secret in SECRETS:
        assert secret not in objects, secret


def run_dataset(s3, bucket: str, prefix: str, dag_id: str, run_id: str) -> dict[str, list]:
    """Every merged JSONL of one run (output, errors, rejected), the run's own folder written as <run>."""
    folder = f"{prefix}/{dag_id}/{run_id}"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=folder + "/").get("Contents", [])]
    found = {}
    for key in sorted(k for k in keys if k.endswith(".jsonl") and k.count("/") == folder.count("/") + 1):
        text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        found[key.rsplit("/", 1)[1]] = [
            json.loads(line) for line in text.replace(f"s3://{bucket}/{folder}", "<run>").splitlines()
        ]
    return found


def test_a_param_naming_a_secret_is_text_in_both_modes(
    vlm_server: OpenAITestServer, s3, attack_env: dict, pod_tier: PodTier
) -> None:
    bucket = attack_env["bucket"]
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    vlm_server.required_key = API_KEY  # the pods' key comes from the vqa-vlm Secret, local mode's from the connection
    rows = [{"id": 1, "image": "a.jpg"}, {"id": 2, "image": ["b.jpg", "a.jpg"]}, {"id": 3, "image": "missing.jpg"}]
    for folder in ("media", f"media/{KEY_REF}"):
        s3.put_object(Bucket=bucket, Key=f"{folder}/a.jpg", Body=make_jpeg((96, 64)))
        s3.put_object(Bucket=bucket, Key=f"{folder}/b.jpg", Body=make_jpeg((64, 96)))
    for key in ("input/rows.jsonl", f"input/{S3_REF}/rows.jsonl"):
        s3.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())

    cases = reference_attacks(bucket)
    runs = [
        (
            f"{mode}: {name}",
            dag_id,
            {**conf, "rows_per_shard": 2},
            pod_tier.env(attack_env["env"]) if mode == "kubernetes" else attack_env["env"],
        )
        for mode in MODES
        for name, (dag_id, conf, _) in cases.items()
    ]
    pods_before = len(pod_tier.pods())
    results = run_all(runs, attack_env)

    datasets: dict[str, dict[str, dict]] = {mode: {} for mode in MODES}
    for label, (code, output, run_home) in results.items():
        mode, name = label.split(": ", 1)
        dag_id, conf, succeeds = cases[name]
        with sqlite3.connect(run_home / "airflow.db") as db:
            ((run_id,),) = db.execute("SELECT run_id FROM dag_run WHERE dag_id=?", (dag_id,)).fetchall()
        if succeeds:
            assert code == 0, (label, output[-6000:])
            prefix = conf["output_prefix"].removeprefix(f"s3://{bucket}/")
            datasets[mode][name] = found = run_dataset(s3, bucket, prefix, dag_id, run_id)
            tag = conf["tag"]
            assert found["generate.jsonl"], (label, found)
            # the answers start with the tag as it was typed
            assert all(f"Answer: {tag}" in row["pers_qa"] for row in found["generate.jsonl"]), (label, found["generate.jsonl"])
            assert [e["reason"] for e in found["generate.errors.jsonl"]] == ["image_not_found"], label
        else:
            assert code != 0, label
            # the worker got the name as typed, and says the server does not serve it; the run stopped at the first worker task
            assert f"model {conf['model']!r} is not served" in output, (label, output[-6000:])
        for secret in SECRETS:
            assert secret not in output + stored(run_home), (label, secret)

    assert datasets["kubernetes"] == datasets["local"]
    pods = pod_tier.pods()[pods_before:]
    assert {p["task_id"] for p in pods} >= {"generate", "quality"}
    assert all(p["exit_code"] == (0 if p["manifest"]["metadata"]["labels"]["dag_id"] == "pers_qa" else 2) for p in pods), [
        (p["task_id"], p["exit_code"]) for p in pods
    ]
    for pod in pods:
        for secret in SECRETS:
            assert secret not in pod["logs"] + json.dumps(pod["manifest"]), secret
    objects = every_object(s3)
    for secret in SECRETS:
        assert secret not in objects, secret
    assert f"output/{S3_REF}/pers_qa/" in objects  # the run's folder is named as typed
