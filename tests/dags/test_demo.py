"""`make demo`'s script: the model it picks, clear failures, and full runs in the slow tier."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from testkit.data import MODEL
from testkit.openai_server import OpenAITestServer, Reply

ROOT = Path(__file__).resolve().parents[2]


def run_demo(env: dict[str, str], timeout: int = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VQA_", "AIRFLOW", "AWS_"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/demo.py")],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_server_that_does_not_answer_is_a_clear_failure() -> None:
    proc = run_demo({"VQA_BASE_URL": "http://127.0.0.1:9/v1"})
    assert proc.returncode == 2
    assert "FAILED: no model to run:" in proc.stdout and "Connection refused" in proc.stdout


def test_vllm_counts_as_installed_only_once_its_install_finished(tmp_path: Path) -> None:
    """make vllm-venv creates the environment first: a failed install leaves its python, and the demo must fall back to transformers."""
    from scripts.local_vllm import vllm_available

    venv = tmp_path / ".venv-vllm"
    assert "is missing" in (vllm_available(venv) or "")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert "its install did not finish" in (vllm_available(venv) or "")
    (venv / ".installed").write_text("")
    assert "no vllm package" in (vllm_available(venv) or "")
    package = venv / "lib" / "python3.11" / "site-packages" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert vllm_available(venv) is None


def test_the_model_choice_without_anything_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No VQA_BASE_URL, no VQA_MODEL, no Hub: vLLM's CPU build (where installed) serves a tiny model built here, said to be noise."""
    from scripts import demo
    from scripts.tiny_vlm import SERVED_NAME

    for name in ("VQA_BASE_URL", "VQA_MODEL", "VQA_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = demo.choose_model(tmp_path)
    assert (
        choice.noise
        and choice.source == str(tmp_path / "models" / SERVED_NAME)
        and (tmp_path / "models" / SERVED_NAME / "config.json").exists()
    )
    assert choice.engine == ("vllm" if (ROOT / ".venv-vllm/bin/python").exists() else "transformers")
    assert "its answers are noise" in choice.describe()
    # where vLLM's CPU build is missing (macOS), or when asked, transformers serves the folder itself
    monkeypatch.setenv("VQA_BACKEND", "transformers")
    fallback = demo.choose_model(tmp_path)
    assert (fallback.engine, fallback.model) == ("transformers", fallback.source)
    # a model given by name is served as it is, and not called noise
    monkeypatch.setenv("VQA_MODEL", "/models/my-vlm")
    assert demo.choose_model(tmp_path) == demo.ModelChoice("/models/my-vlm", "transformers", source="/models/my-vlm")


@pytest.mark.slow
def test_demo_runs_the_dags_through_airflow_standalone_and_says_why_one_failed(
    vlm_server: OpenAITestServer, tmp_path: Path
) -> None:
    # the double lists one model, so VQA_MODEL may be omitted; it refuses the key for the video requests
    # only: image_qa and pers_qa succeed, video_qa's first task fails at once (no retries) and the demo says why
    def refuse_video(body: dict) -> Reply | None:
        return Reply(status=401) if body["response_format"]["json_schema"]["name"] == "VideoQASet" else None

    vlm_server.responder = refuse_video
    proc = run_demo({"VQA_BASE_URL": vlm_server.base_url, "VQA_DEMO_DIR": str(tmp_path)}, timeout=900)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:] + (tmp_path / "logs/airflow.log").read_text()[-5000:]
    # the double keeps every pair (its scripted verdicts all agree and ground)
    assert "image_qa: rows_in=4 rows_out=4 rows_failed=0 rows_rejected=0" in out
    assert "image_qa: quality checks kept 8 pairs and rejected 0 (acceptance 100.0%)" in out
    # the demo annotates: every pair's verdicts counted (the double grounds each with 5; its blind answers never agree)
    assert (
        "image_qa: verdicts (annotated, every pair kept): grounding scores 1: 0 · 2: 0 · 3: 0 · 4: 0 · 5: 8; blind "
        "answer agreed for 0 of 8; no pair failed a check" in out
    )
    assert "pers_qa: rows_in=3 rows_out=3 rows_failed=0 rows_rejected=0" in out
    assert re.search(r"image_qa: Hub-ready folder \(datasets, TRL\) s3://vqa-demo/output/image_qa/\S+/hf\n", out)
    assert re.search(r"pers_qa: ShareGPT JSON \(LLaMA-Factory\) s3://vqa-demo/output/pers_qa/\S+/generate\.sharegpt\.json", out)
    assert re.search(r"pers_qa: LLaVA conversation JSON s3://vqa-demo/output/pers_qa/\S+/generate\.llava\.json", out)
    assert re.search(r"image_qa: dataset card s3://vqa-demo/output/image_qa/\S+/README\.md", out)
    assert "FAILED: video_qa run ended failed. Why:" in out
    assert re.search(r"video_qa\.initial\[0\]: .*ConfigError: model server refused the API key: HTTP 401", out), out[-3000:]

    def output(dag_id: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "output" / f"{dag_id}.jsonl").read_text().splitlines()]

    image_qa, pers_qa = output("image_qa"), output("pers_qa")
    assert len(image_qa) == 4 and all(len(r["qa_pairs"]) == 2 for r in image_qa)
    assert image_qa[1]["vqa_provenance"]["image_qa"]["model"] == MODEL
    assert all(r["pers_qa"].startswith("Question: ") and " Answer: <mam> " in r["pers_qa"] for r in pers_qa)
    # one request per image row and per pers row; the quality stage's three per pair (8 image pairs,
    # 3 pers pairs); and the first video's refused request (the second video's, if it was sent before the task failed)
    sent = Counter(r["response_format"]["json_schema"]["name"] for r in vlm_server.requests)
    assert 1 <= sent.pop("VideoQASet") <= 2
    # the ingest captioned the video file's two clips before the initial stage failed
    assert sent == {
        "ImageQAAnswer": 4,
        "PersQAAnswer": 3,
        "BlindAnswer": 11,
        "AgreementVerdict": 11,
        "GroundingVerdict": 11,
        "ClipCaption": 2,
    }


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_with_nothing_configured_runs_every_dag_on_real_inference(tmp_path: Path) -> None:
    """A clean machine without the Hub: vLLM's CPU build serves the tiny model built here; every row ends in output, errors
    or rejected, and the demo says what wrote them."""
    proc = run_demo({"VQA_DEMO_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}, timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    assert "its answers are NOISE" in out and "the model: tiny-idefics3 (a tiny random-weight model built here" in out
    assert "served by vLLM's CPU build on this machine" in out
    made = 0
    for dag_id, rows in (("image_qa", 4), ("pers_qa", 3), ("video_qa", 2)):
        # the random model's verdicts decide which rows are kept: every row is accounted for, and the
        # quality stage judged the pairs of every row that was made
        found = re.search(rf"{dag_id}: rows_in={rows} rows_out=(\d+) rows_failed=(\d+) rows_rejected=(\d+)", out)
        assert found, out[-3000:]
        kept, failed, rejected = map(int, found.groups())
        assert kept + rejected >= 1 and kept + failed + rejected == rows, out[-3000:]
        judged = re.search(rf"{dag_id}: quality checks kept (\d+) pairs and rejected (\d+)", out)
        assert judged and int(judged.group(1)) + int(judged.group(2)) >= kept + rejected, out[-3000:]
        made += kept
        assert re.search(rf"{dag_id}: QA preview http://127\.0\.0\.1:\d+/vqa-demo/output/{dag_id}/\S+\.preview\.html\?", out)
    assert re.search(
        r"every DAG ran \(image_qa: \d+ rows out, pers_qa: \d+ rows out, video_qa: \d+ rows out\); the model was tiny-idefics3",
        out,
    )
    assert "the quality checks' verdicts come from the same model" in out
    # the video file went in raw: the ingest found its two scenes and stored four frames of each; the exports say where they are
    assert re.search(
        r"video_qa: ingested media/video/sunset_teaser\.mp4: 2 clips \(0-2 s, 2-4 s\), 8 frames in s3://vqa-demo/output/video_qa/\S+/ingest/shard-00000\.frames/[0-9a-f]{20}/",
        out,
    ), out[-3000:]
    for name, path in (
        ("Hub-ready folder \\(datasets, TRL\\)", "hf"),
        ("LLaVA conversation JSON", "final\\.llava\\.json"),
        ("dataset card", "README\\.md"),
    ):
        assert re.search(rf"video_qa: {name} s3://vqa-demo/output/video_qa/\S+/{path}", out), out[-3000:]
    records = [
        json.loads(line)
        for dag_id in ("image_qa", "pers_qa", "video_qa")
        for line in (tmp_path / "output" / f"{dag_id}.jsonl").read_text().splitlines()
    ]
    assert len(records) == made
    assert all(r["vqa_provenance"]["quality"]["model"] == "tiny-idefics3" for r in records)
