"""`make demo`'s script: a clear message without a model server; the full run in the slow tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL
from tests.doubles.openai_server import OpenAITestServer

ROOT = Path(__file__).resolve().parents[1]


def run_demo(env: dict[str, str], timeout: int = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VQA_", "AIRFLOW", "AWS_"))}
    return subprocess.run([sys.executable, str(ROOT / "scripts/demo.py")], env={**clean, **env}, capture_output=True, text=True, timeout=timeout, check=False)


def test_the_openai_backend_without_a_server_says_what_to_set() -> None:
    # (without VQA_BASE_URL and VQA_BACKEND the demo runs a model on the CPU instead)
    proc = run_demo({"VQA_BACKEND": "openai"})
    assert proc.returncode == 2
    assert "VQA_BASE_URL is not set" in proc.stderr and "vllm serve" in proc.stderr


@pytest.mark.slow
def test_demo_runs_the_three_dags_through_airflow_standalone(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    # the double lists one model, so VQA_MODEL may be omitted
    proc = run_demo({"VQA_BASE_URL": vlm_server.base_url, "VQA_DEMO_DIR": str(tmp_path)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (tmp_path / "logs/airflow.log").read_text()[-5000:]
    assert "image_qa: rows_in=4 rows_out=4 rows_failed=0" in proc.stdout
    assert "pers_qa: rows_in=3 rows_out=3 rows_failed=0" in proc.stdout
    assert "video_qa: rows_in=2 rows_out=2 rows_failed=0" in proc.stdout

    def output(dag_id: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "output" / f"{dag_id}.jsonl").read_text().splitlines()]

    image_qa, pers_qa, video_qa = output("image_qa"), output("pers_qa"), output("video_qa")
    assert len(image_qa) == 4 and all(len(r["qa_pairs"]) == 3 for r in image_qa)
    assert image_qa[1]["vqa_provenance"]["image_qa"]["model"] == MODEL
    assert all(r["pers_qa"].startswith("Question: ") and " Answer: <mam> " in r["pers_qa"] for r in pers_qa)
    assert [r["id"] for r in video_qa] == ["bouncing_ad", "sunset_teaser"]
    assert all(len(r["QA"]) == 10 and set(r["QA"][0]) == {"Label", "Question", "Answer"} for r in video_qa)
    # the videos' frames (18 and 12) are sampled to the 8-frame budget
    assert [len(r["vqa_provenance"]["video_qa_initial"]["frames_sent"]) for r in video_qa] == [8, 8]
    # image 4 + pers 3 + video 2 x (initial + 3 x (recruit, expert, revise) + final)
    assert len(vlm_server.requests) == 4 + 3 + 2 * 11


@pytest.mark.slow
def test_demo_without_a_model_server_runs_a_model_on_the_cpu(tiny_vlm: Path, tmp_path: Path) -> None:
    import ast
    import re

    from tests.doubles.tiny_vlm import PARSE_REASONS

    proc = run_demo({"VQA_MODEL": str(tiny_vlm), "VQA_DEMO_DIR": str(tmp_path)}, timeout=900)
    out = proc.stdout
    assert "runs on this machine's CPU (transformers)" in out, out[-3000:] + proc.stderr[-3000:]
    # the random-weight model's answers never parse: every row of the three DAGs is in errors with
    # a parse reason, nothing crashed, and the demo says it produced nothing (exit 1)
    for dag_id, rows in (("image_qa", 4), ("pers_qa", 3), ("video_qa", 2)):
        found = re.search(rf"{dag_id}: rows_in={rows} rows_out=0 rows_failed={rows} failures=(\{{.*\}})", out)
        assert found and set(ast.literal_eval(found.group(1))) <= PARSE_REASONS, out[-3000:]
        assert f"FAILED: {dag_id} produced no rows" in out
        assert re.search(rf"{dag_id}: QA preview http://127\.0\.0\.1:\d+/vqa-demo/output/{dag_id}/\S+\.preview\.html\?", out)
    assert proc.returncode == 1
