"""Slow tier: ``airflow dags test`` runs whole DAGs in local mode against the S3 and model servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.airflow_env import airflow, airflow_env
from tests.conftest import MODEL, make_jpeg
from tests.doubles.openai_server import OpenAITestServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("airflow_home")


def test_image_qa_dag_end_to_end(vlm_server: OpenAITestServer, s3, bucket: str, s3_endpoint: str, airflow_home: Path) -> None:
    s3.put_object(Bucket=bucket, Key="media/street.jpg", Body=make_jpeg((640, 480)))
    s3.put_object(Bucket=bucket, Key="media/side.jpg", Body=make_jpeg((300, 300)))
    rows = [{"image": ["media/street.jpg", "media/side.jpg"]}, {"image": "media/street.jpg"}, {"image": "media/missing.jpg"}]
    s3.put_object(Bucket=bucket, Key="input/rows.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    env = airflow_env(airflow_home, s3_endpoint=s3_endpoint, vlm_base_url=vlm_server.base_url, model=MODEL)
    migrate = airflow("db", "migrate", env=env)
    assert migrate.returncode == 0, migrate.stderr[-2000:]

    conf = {
        "input_uri": f"s3://{bucket}/input/rows.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/",
        "pairs_per_row": 2,
        "seed": 5,
    }
    proc = airflow("dags", "test", "image_qa", "-c", json.dumps(conf), env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]]
    outputs = [k for k in keys if k.endswith("/generate.jsonl")]
    assert len(outputs) == 1 and outputs[0].startswith("output/image_qa/manual__")  # dag id / run id / task id
    out = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=outputs[0])["Body"].read().decode().splitlines()]
    errors_key = outputs[0].replace("generate.jsonl", "generate.errors.jsonl")
    errors = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=errors_key)["Body"].read().decode().splitlines()]
    assert [len(r["qa_pairs"]) for r in out] == [2, 2]
    assert "saw 2 image(s) 640x480,300x300" in out[0]["qa_pairs"][0]["answer"]
    assert [e["reason"] for e in errors] == ["image_not_found"]
    assert out[0]["vqa_provenance"]["image_qa"]["seed"] == 5
    assert all(r["seed"] is not None for r in vlm_server.requests)
    assert "sk-airflow-secret-456" not in log and "testing-secret-value" not in log
