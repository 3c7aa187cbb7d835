"""Secrets never leave the process: not in logs, manifests (XCom), outputs, errors files or checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-live-7f3a9c1e5b-never-print-me"
AWS_SECRET = "aws-secret-5d2b8e0c4f-never-print-me"


def everything_written(s3, bucket: str, *texts: str) -> str:
    objects = [
        s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode("utf-8", "replace")
        for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    ]
    return "\n".join([*texts, *objects])


def worker(argv: list[str], server: OpenAITestServer, endpoint: str, xcom: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "plugins"),
        "VQA_BASE_URL": server.base_url,
        "VQA_MODEL": MODEL,
        "VQA_API_KEY": API_KEY,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return subprocess.run(
        [sys.executable, "-m", "vqa_operators", "run", *argv, "--xcom-file", str(xcom), "--max-retries", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_no_secret_in_anything_the_worker_writes(
    vlm_server: OpenAITestServer, s3, bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    s3.put_object(Bucket=bucket, Key="media/a.jpg", Body=make_jpeg((64, 64)))
    lines = [json.dumps({"id": i, "image": "media/a.jpg"}) for i in range(12)] + [
        "{bad",
        json.dumps({"id": "x", "image": "media/none.jpg"}),
    ]
    s3.put_object(Bucket=bucket, Key="in.jsonl", Body="\n".join(lines).encode())
    vlm_server.required_key = API_KEY
    vlm_server.inject({"500": 0.1, "drop": 0.1, "invalid_json": 0.2, "schema_mismatch": 0.2}, seed=3)
    argv = [
        "image_qa",
        "--input",
        f"s3://{bucket}/in.jsonl",
        "--output",
        f"s3://{bucket}/out/rows.jsonl",
        "--media-root",
        f"s3://{bucket}/",
    ]
    ok = worker(argv, vlm_server, s3_endpoint, tmp_path / "xcom.json")
    assert ok.returncode == 0, ok.stderr
    assert vlm_server.authorizations and set(vlm_server.authorizations) == {f"Bearer {API_KEY}"}  # the key was used ...

    vlm_server.required_key = "sk-some-other-key"  # ... and a refused key is reported without it
    refused = worker([*argv[:4], f"s3://{bucket}/out/refused.jsonl", *argv[5:]], vlm_server, s3_endpoint, tmp_path / "xcom2.json")
    assert refused.returncode == 2 and "refused the API key: HTTP 401" in refused.stderr

    written = everything_written(
        s3, bucket, ok.stdout, ok.stderr, refused.stdout, refused.stderr, (tmp_path / "xcom.json").read_text()
    )
    assert (
        "rows_reused" in written and "failures_by_reason" in written and "raw_output" in written
    )  # manifest, errors file present
    assert API_KEY not in written and AWS_SECRET not in written
