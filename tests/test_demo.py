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


def test_without_a_model_server_it_says_what_to_set() -> None:
    proc = run_demo({})
    assert proc.returncode == 2
    assert "VQA_BASE_URL is not set" in proc.stderr and "vllm serve" in proc.stderr


@pytest.mark.slow
def test_demo_runs_image_qa_through_airflow_standalone(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    # the double lists one model, so VQA_MODEL may be omitted
    proc = run_demo({"VQA_BASE_URL": vlm_server.base_url, "VQA_DEMO_DIR": str(tmp_path)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (tmp_path / "logs/airflow.log").read_text()[-5000:]
    assert "rows_in=4 rows_out=4 rows_failed=0" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "output" / "image_qa.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(len(r["qa_pairs"]) == 3 for r in records)
    assert records[1]["vqa_provenance"]["image_qa"]["model"] == MODEL
    assert len(vlm_server.requests) == 4
