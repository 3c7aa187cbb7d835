"""What users see before and around a run: the trigger form's params, the schedule, the plan's checks, progress and retry lines."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from vqa_operators.generators.base import Usage
from vqa_operators.operators.callbacks import summary
from vqa_operators.worker.run_loop import Progress, progress_batch

ROOT = Path(__file__).resolve().parents[1]
FORM = {"input_uri", "output_prefix", "model", "seed", "rows_per_shard", "max_shards", "media_root", "concurrency"}
QUALITY = {"blind_check", "grounding_check", "min_judge_score", "remove_near_duplicates", "near_duplicate_threshold", "near_duplicate_key"}
EXPORT = {"export_formats", "embed_images"}
INGEST = {"frames_per_clip", "scene_threshold", "min_clip_s", "max_clip_s", "clip_s", "caption", "transcribe"}
SPECIFIC = {"image_qa": {"pairs_per_row"}, "pers_qa": {"tag"}, "video_qa": {"max_frames", "max_iterations", "final_pairs"} | INGEST}


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.mark.parametrize("dag_id", ["image_qa", "pers_qa", "video_qa"])
def test_every_param_is_typed_titled_and_described(dagbag, dag_id: str) -> None:
    params = dagbag.dags[dag_id].params
    assert set(params) == FORM | QUALITY | EXPORT | SPECIFIC[dag_id]
    for name in params:
        param = params.get_param(name)
        assert param.schema.get("type") and param.schema.get("title") and len(param.description or "") > 20, name
    assert "{{ ds }}" in params["input_uri"]  # the default reads the run's date partition


@pytest.mark.parametrize(
    ("dag_id", "bad"),
    [
        ("image_qa", {"pairs_per_row": 0}),
        ("image_qa", {"pairs_per_row": "three"}),
        ("image_qa", {"input_uri": "relative/path.jsonl"}),
        ("image_qa", {"output_prefix": "ftp://x/y"}),
        ("pers_qa", {"tag": "two words"}),
        ("video_qa", {"max_iterations": 99}),
        ("video_qa", {"max_shards": 10_000}),
        ("video_qa", {"rows_per_shard": 0}),
        ("video_qa", {"frames_per_clip": 0}),
        ("video_qa", {"transcribe": "maybe"}),
        ("video_qa", {"scene_threshold": 2}),
    ],
)
def test_the_form_rejects_bad_values_before_a_run_exists(dagbag, dag_id: str, bad: dict) -> None:
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(dagbag.dags[dag_id].params)
    params.validate()  # the defaults are valid
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(bad))}"):
        params.update(bad)
        params.validate()


def test_the_dags_are_daily_without_catchup_unless_told_otherwise(dagbag, monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.operators import dag_config

    for dag_id in ("image_qa", "pers_qa", "video_qa"):
        assert dagbag.dags[dag_id].catchup is False and dagbag.dags[dag_id].schedule == "@daily"
    # the downstream example is scheduled on the datasets, not on the clock
    assert dagbag.dags["dataset_ready"].catchup is False and type(dagbag.dags["dataset_ready"].schedule).__name__ == "AssetAny"
    monkeypatch.setenv("VQA_SCHEDULE", "none")
    assert dag_config._schedule() is None
    monkeypatch.setenv("VQA_SCHEDULE", "0 3 * * *")
    assert dag_config._schedule() == "0 3 * * *"


def plan_context(dag, **extra) -> dict:
    params = {**dag.params.dump(), **extra.pop("params", {})}
    return {"params": params, "dag": dag, "run_id": "manual__x", "ti": SimpleNamespace(map_index=-1, try_number=1), **extra}


def run_plan(dag, context: dict):
    task = copy.deepcopy(dag.get_task("plan"))  # rendering is in place; each test renders its own copy, as each run does
    context["task"] = task
    task.render_template_fields(context)
    return task.execute(context)


def test_the_plan_renders_the_run_date_into_input_uri(dagbag, s3, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="raw/2026-03-04/input.jsonl", Body=b'{"image": "s3://x/a.jpg"}\n{"image": "s3://x/b.jpg"}\n')
    dag = dagbag.dags["image_qa"]
    context = plan_context(dag, params={"input_uri": f"s3://{bucket}/raw/{{{{ ds }}}}/input.jsonl"}, ds="2026-03-04")
    shards = run_plan(dag, context)
    assert [(s["input"], s["rows"]) for s in shards] == [(f"s3://{bucket}/raw/2026-03-04/input.jsonl", 2)]


def test_a_run_without_a_logical_date_fails_clearly_when_input_uri_needs_one(dagbag) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["image_qa"]
    with pytest.raises(AirflowFailException, match=r"'ds' is undefined\. A run triggered without a logical date has no ds"):
        run_plan(dag, plan_context(dag))  # the default input_uri uses {{ ds }}; this context has none


@pytest.mark.parametrize(
    ("dag_id", "params", "env", "message"),
    [
        ("image_qa", {"media_root": "s3://elsewhere/"}, {"VQA_ALLOWED_MEDIA_ROOTS": "s3://media/"}, "media root 's3://elsewhere/' is outside"),
        ("pers_qa", {}, {"VQA_BACKEND": "tensorrt"}, "backend"),
    ],
)
def test_the_plan_rejects_what_the_schema_cannot_before_any_model_call(
    dagbag, monkeypatch: pytest.MonkeyPatch, dag_id: str, params: dict, env: dict, message: str
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dag = dagbag.dags[dag_id]
    # the input does not even exist: the parameters are checked before anything is read or asked
    context = plan_context(dag, params={"input_uri": "s3://nowhere/in.jsonl", **params})
    with pytest.raises(AirflowFailException, match=f"invalid parameters: .*{message}"):
        run_plan(dag, context)


def test_progress_line_per_batch_counts_rate_tokens_eta_and_failures() -> None:
    progress = Progress("image_qa", total=100, batch=progress_batch(100, in_flight=320))
    assert progress.batch == 5  # a twentieth of the shard when that is smaller than the window
    lines = []
    for i in range(10):
        progress.add({"error": {"reason": "bad_image"}} if i == 3 else {"out": {}}, reused=i < 2)
        if progress.due():
            lines.append(progress.line(Usage(requests=8, prompt_tokens=12_000, completion_tokens=800)))
    assert len(lines) == 2
    head, rest = lines[1].split(" rows/s, ")
    assert head.startswith("image_qa: 10/100 rows (10.0%), ") and float(head.rsplit(", ", 1)[1]) > 0
    assert rest.startswith("12,800 tokens (in 12,000, out 800), ETA ")
    assert rest.endswith("1 failed {'bad_image': 1}, 2 reused")
    progress.finished = 9  # eight rows in order and one ahead of them, checkpointed
    assert dataclasses.asdict(progress.snapshot()) == {
        "rows_total": 100, "rows_done": 10, "rows_finished": 9, "rows_reused": 2, "rows_failed": 1, "failures_by_reason": {"bad_image": 1},
    }
    assert progress_batch(None, in_flight=320) == 320 and progress_batch(10_000, in_flight=320) == 320


def test_the_retry_line_names_the_try_the_error_and_what_the_try_did() -> None:
    from vqa_operators.exceptions import ServerUnavailableError, TryProgress

    error = ServerUnavailableError("model server at http://vllm:8000/v1 unreachable\nTraceback ...")
    error.progress = TryProgress(rows_total=400, rows_done=150, rows_finished=120, rows_reused=40, rows_failed=3, failures_by_reason={"bad_image": 3})
    ti = SimpleNamespace(dag_id="image_qa", task_id="generate", map_index=2, try_number=1, max_tries=3)
    line = summary({"ti": ti, "exception": error}, "failed, will retry")
    assert line == (
        "image_qa.generate[2] try 1 of 4 failed, will retry: ServerUnavailableError: model server at http://vllm:8000/v1 unreachable; "
        "160/400 rows finished (120 this try, 40 reused), 3 failed {'bad_image': 3}"
    )
    plain = summary({"ti": SimpleNamespace(dag_id="d", task_id="merge", map_index=-1, try_number=4, max_tries=3), "exception": ValueError("x")}, "failed for good")
    assert plain == "d.merge try 4 of 4 failed for good: ValueError: x"
    assert json.dumps(dataclasses.asdict(error.progress))  # the summary's counts are plain data, as the manifest's
