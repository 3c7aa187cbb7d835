"""Slow tier: what a user who may only trigger runs tries, through ``airflow dags test`` of the real DAGs.

Each attack fails in ``plan``, on its first try, before a byte is read or written; and neither
the deployment's secrets (the ``vqa_vlm`` connection's API key, an Airflow Variable) nor a line of
a private file on the worker appears in any log, in the Airflow database or in any object.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testkit.data import MODEL, make_jpeg
from tests.airflow_env import airflow, airflow_env, in_home

pytestmark = pytest.mark.slow

API_KEY = "sk-airflow-secret-456"  # airflow_env's vqa_vlm password
VARIABLE = "var-secret-9c41e7-never-print"
PRIVATE = ["PRIVATE-LINE-1 root:x:0:0", '{"image": "PRIVATE-LINE-2.jpg"}', "PRIVATE-LINE-3 token=abc"]


def attacks(bucket: str, other: str, allowed: Path, private: Path, evil_out: Path) -> dict[str, tuple[str, dict, str]]:
    """name -> (dag_id, conf, the rule plan's message names)."""
    base = {"input_uri": f"s3://{bucket}/input/rows.jsonl", "output_prefix": f"s3://{bucket}/output", "media_root": f"s3://{bucket}/"}
    return {
        "template naming conn": ("image_qa", {**base, "input_uri": f"s3://{bucket}/input/{{{{ conn.vqa_vlm.password }}}}.jsonl"}, "param input_uri holds a template"),
        "template naming var": ("pers_qa", {**base, "input_uri": f"s3://{bucket}/input/{{{{ var.value.vqa_note }}}}.jsonl"}, "param input_uri holds a template"),
        "local file outside the roots": ("video_qa", {**base, "input_uri": str(private)}, "param input_uri lies outside the allowed roots"),
        "traversal": ("image_qa", {**base, "input_uri": f"{allowed}/../private/secrets.jsonl"}, "param input_uri has a '.' or '..' segment"),
        "symlink": ("pers_qa", {**base, "input_uri": str(allowed / "link.jsonl")}, "param input_uri lies outside the allowed roots"),
        "another bucket": ("video_qa", {**base, "input_uri": f"s3://{other}/input/rows.jsonl"}, "param input_uri lies outside the allowed roots"),
        "local output path": ("image_qa", {**base, "output_prefix": str(evil_out)}, "param output_prefix lies outside the allowed roots"),
    }


def test_each_trigger_attack_fails_in_plan_and_leaks_nothing(_vlm_server, s3, s3_endpoint: str, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    bucket, other = f"vqa-attacks-{suffix}", f"vqa-other-team-{suffix}"
    for name in (bucket, other):
        s3.create_bucket(Bucket=name)
    rows = "".join(json.dumps({"image": "media/a.jpg"}) + "\n" for _ in range(3))
    s3.put_object(Bucket=bucket, Key="media/a.jpg", Body=make_jpeg((64, 64)))
    s3.put_object(Bucket=bucket, Key="input/rows.jsonl", Body=rows.encode())
    s3.put_object(Bucket=other, Key="input/rows.jsonl", Body=rows.encode())  # readable with the deployment's credentials
    # a private file on the worker, an allowed local folder beside it, and a symlink in that folder pointing at the file
    (tmp_path / "private").mkdir()
    private = tmp_path / "private" / "secrets.jsonl"
    private.write_text("\n".join(PRIVATE) + "\n")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link.jsonl").symlink_to(private)
    evil_out = tmp_path / "evil-out"

    home = tmp_path / "home"
    env = airflow_env(home, s3_endpoint=s3_endpoint, vlm_base_url=_vlm_server.base_url, model=MODEL)
    env.update(
        {
            "AIRFLOW_VAR_VQA_NOTE": VARIABLE,
            "VQA_ALLOWED_INPUT_ROOTS": f"s3://{bucket}/input,{allowed}",
            "VQA_ALLOWED_OUTPUT_ROOTS": f"s3://{bucket}/output",
            "VQA_ALLOWED_MEDIA_ROOTS": f"s3://{bucket}/",
        }
    )
    migrate = airflow("db", "migrate", env=env)
    assert migrate.returncode == 0, migrate.stderr[-2000:]

    cases = attacks(bucket, other, allowed, private, evil_out)

    def trigger(item: tuple[int, tuple[str, tuple[str, dict, str]]]) -> tuple[str, str, Path]:
        index, (name, (dag_id, conf, _)) = item
        # each run in a home of its own (a copy of the migrated database), so that two can run at once on SQLite
        run_home = tmp_path / f"home-{index}"
        run_home.mkdir()
        shutil.copy(home / "airflow.db", run_home / "airflow.db")
        proc = airflow("dags", "test", dag_id, "-c", json.dumps(conf), env=in_home(env, run_home))
        assert proc.returncode != 0, f"{name}: the run succeeded"
        return name, proc.stdout + proc.stderr, run_home

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(trigger, enumerate(cases.items())))

    for name, output, run_home in results:
        dag_id, _, rule = cases[name]
        with sqlite3.connect(run_home / "airflow.db") as db:
            instances = db.execute("SELECT task_id, try_number, state FROM task_instance WHERE dag_id=?", (dag_id,)).fetchall()
            stored = "\n".join(str(row) for table in ("xcom", "log", "task_instance", "dag_run") for row in db.execute(f"SELECT * FROM {table}"))
        tries = {task_id: (try_number, state) for task_id, try_number, state in instances}
        # plan failed on its first try, not retried; nothing after it ran
        assert tries["plan"] == (1, "failed"), (name, tries)
        assert all(state in ("upstream_failed", None) for task, (_, state) in tries.items() if task != "plan"), (name, tries)
        assert f"invalid parameters: {rule}" in output, (name, output[-3000:])
        logs = output + "\n".join(p.read_text(errors="replace") for p in (run_home / "logs").rglob("*") if p.is_file()) + stored
        for secret in (API_KEY, VARIABLE, *PRIVATE):
            assert secret not in logs, (name, secret)

    # nothing was written: no object under any output prefix, no local output folder; and no object anywhere holds a secret
    assert sorted(o["Key"] for name in (bucket, other) for o in s3.list_objects_v2(Bucket=name).get("Contents", [])) == ["input/rows.jsonl", "input/rows.jsonl", "media/a.jpg"]
    assert not evil_out.exists()
    everywhere = [(b["Name"], o["Key"]) for b in s3.list_buckets()["Buckets"] for o in s3.list_objects_v2(Bucket=b["Name"]).get("Contents", [])]
    objects = "\n".join(s3.get_object(Bucket=name, Key=key)["Body"].read().decode("utf-8", "replace") for name, key in everywhere)
    for secret in (API_KEY, VARIABLE, *PRIVATE):
        assert secret not in objects, secret
