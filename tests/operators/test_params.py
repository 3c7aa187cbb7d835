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
from vqa_operators.records import Finished
from vqa_operators.worker.progress import Progress, progress_batch

ROOT = Path(__file__).resolve().parents[2]
FORM = {
    "input_uri",
    "output_prefix",
    "model",
    "seed",
    "rows_per_shard",
    "max_shards",
    "media_root",
    "concurrency",
    "estimate_rows",
    "estimate_requests_per_s",
}
QUALITY = {
    "blind_check",
    "grounding_check",
    "min_judge_score",
    "quality_mode",
    "remove_near_duplicates",
    "near_duplicate_threshold",
    "near_duplicate_key",
}
EXPORT = {"export_formats", "copy_media", "embed_images"}
INGEST = {"frames_per_clip", "scene_threshold", "min_clip_s", "max_clip_s", "clip_s", "caption", "transcribe"}
SPECIFIC = {
    "image_qa": {"pairs_per_row"},
    "pers_qa": {"tag"},
    "video_qa": {"max_frames", "max_iterations", "final_pairs"} | INGEST,
}


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
    # no VQA_DATA_ROOT here: no default location, so a run must name its own (test_the_locations_default_to_the_data_root)
    assert (params["input_uri"], params["output_prefix"], params["media_root"]) == (None, None, None)


@pytest.mark.parametrize(
    ("dag_file", "param", "options", "field"),
    [
        ("image_qa", "pairs_per_row", "vqa_operators.generators.image_qa:ImageQAOptions", "pairs_per_row"),
        ("pers_qa", "tag", "vqa_operators.generators.pers_qa:PersQAOptions", "tag"),
        ("video_qa", "max_frames", "vqa_operators.generators.video_qa:VideoQAOptions", "max_frames"),
        ("video_qa", "max_iterations", "vqa_operators.generators.video_qa:VideoQAMultiAgentOptions", "max_iterations"),
        ("video_qa", "final_pairs", "vqa_operators.generators.video_qa:VideoQAFinalOptions", "final_pairs"),
        ("video_qa", "frames_per_clip", "vqa_operators.generators.video_ingest:VideoIngestOptions", "frames_per_clip"),
        ("image_qa", "min_judge_score", "vqa_operators.generators.quality:QualityOptions", "min_judge_score"),
        ("image_qa", "quality_mode", "vqa_operators.generators.quality:QualityOptions", "quality_mode"),
        ("image_qa", "near_duplicate_threshold", "vqa_operators.records:NearDuplicateSettings", "near_duplicate_threshold"),
    ],
)
def test_a_dag_param_takes_its_default_and_bounds_from_the_options_model(
    dagbag, dag_file: str, param: str, options: str, field: str
) -> None:
    """The trigger form offers what the worker accepts: the DAG's param and the options field have one home, the model."""
    import importlib

    module, _, name = options.partition(":")
    schema = getattr(importlib.import_module(module), name).model_json_schema()["properties"][field]
    offered = dagbag.dags[dag_file].params.get_param(param)
    assert offered.value == schema["default"]
    for key in ("type", "minimum", "maximum", "exclusiveMinimum", "enum", "pattern", "maxLength"):
        assert offered.schema.get(key) == schema.get(key), key


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
    # no VQA_DATA_ROOT in the tests: the locations a run would otherwise default to
    params = {**dag.params.dump(), "output_prefix": "s3://data/out", "media_root": "s3://data/", **extra.pop("params", {})}
    return {
        "params": params,
        "dag": dag,
        "run_id": "manual__x",
        "ti": SimpleNamespace(task_id="plan", map_index=-1, try_number=1),
        **extra,
    }


def run_plan(dag, context: dict):
    task = copy.deepcopy(dag.get_task("plan"))  # rendering is in place; each test renders its own copy, as each run does
    context["task"] = task
    task.render_template_fields(context)
    return task.execute(context)


def test_the_plan_fills_the_run_date_into_input_uri(dagbag, s3, bucket: str) -> None:
    import pendulum

    s3.put_object(
        Bucket=bucket, Key="raw/2026-03-03/20260304/input.jsonl", Body=b'{"image": "s3://x/a.jpg"}\n{"image": "s3://x/b.jpg"}\n'
    )
    dag = dagbag.dags["image_qa"]
    uri = f"s3://{bucket}/raw/{{{{ macros.ds_add(ds, -1) }}}}/{{{{ds_nodash}}}}/input.jsonl"
    context = plan_context(dag, params={"input_uri": uri}, logical_date=pendulum.datetime(2026, 3, 4, tz="UTC"))
    shards = run_plan(dag, context)
    assert [(s["input"], s["rows"]) for s in shards] == [(f"s3://{bucket}/raw/2026-03-03/20260304/input.jsonl", 2)]


def test_a_run_without_a_logical_date_fails_clearly_when_input_uri_needs_one(dagbag) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["image_qa"]
    params = {"input_uri": "s3://data/raw/{{ ds }}/input.jsonl", "output_prefix": "s3://data/out", "media_root": "s3://data/"}
    with pytest.raises(
        AirflowFailException,
        match=r"input_uri uses the run's date, and this run has no logical date \(a run triggered without one has no ds\)",
    ):
        run_plan(dag, plan_context(dag, params=params))  # this context has no logical date


def test_the_locations_default_to_the_data_root_and_without_one_a_run_must_name_them(
    dagbag, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["video_qa"]
    with pytest.raises(
        AirflowFailException,
        match="param input_uri is not given, and VQA_DATA_ROOT is not set: give input_uri, or set VQA_DATA_ROOT",
    ):
        run_plan(dag, plan_context(dag))  # nothing is read: no bucket is assumed
    monkeypatch.setenv("VQA_DATA_ROOT", "s3://acme-vqa/datasets/")
    params = DagBag(dag_folder=str(ROOT / "dags")).dags["video_qa"].params
    assert (params["input_uri"], params["output_prefix"], params["media_root"]) == (
        "s3://acme-vqa/datasets/raw/video_qa/{{ ds }}/input.jsonl",
        "s3://acme-vqa/datasets/output",
        "s3://acme-vqa/datasets/",
    )
    monkeypatch.setenv("VQA_DATA_ROOT", "s3://x")  # not a bucket name: the DAGs' params could not hold it
    with pytest.raises(Exception, match="VQA_DATA_ROOT must be an absolute folder or s3://bucket"):
        from vqa_operators import settings

        settings.environment()


@pytest.mark.parametrize(
    ("dag_id", "params", "env", "message"),
    [
        (
            "image_qa",
            {"media_root": "s3://elsewhere/"},
            {"VQA_ALLOWED_MEDIA_ROOTS": "s3://media/"},
            r"param media_root lies outside the allowed roots \(VQA_ALLOWED_MEDIA_ROOTS: s3://media/\)",
        ),
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


ATTACKS = [
    # (params, env, the rule the message names); the input never exists: nothing may be read before the check
    (
        {"input_uri": "s3://nowhere/{{ conn.vqa_vlm.password }}.jsonl"},
        {},
        "param input_uri holds a template that is not one of the run's dates",
    ),
    (
        {"input_uri": "s3://nowhere/{{ var.value.vqa_note }}.jsonl"},
        {},
        "param input_uri holds a template that is not one of the run's dates",
    ),
    ({"model": "{{ conn.vqa_vlm.password }}"}, {}, "param model holds a template"),
    ({"output_prefix": "s3://nowhere/{% for c in range(2) %}{{ c }}{% endfor %}"}, {}, "param output_prefix holds a template"),
    ({"media_root": "s3://nowhere/{{ var.json }}/"}, {}, "param media_root holds a template"),
    ({"input_uri": "/etc/passwd"}, {}, "param input_uri is a local path, and VQA_ALLOWED_INPUT_ROOTS is not set"),
    (
        {"input_uri": "/srv/vqa/in/../../../etc/passwd"},
        {"VQA_ALLOWED_INPUT_ROOTS": "/srv/vqa/in"},
        "param input_uri has a '.' or '..' segment",
    ),
    (
        {"input_uri": "s3://other-team/in.jsonl"},
        {"VQA_ALLOWED_INPUT_ROOTS": "s3://nowhere"},
        r"param input_uri lies outside the allowed roots \(VQA_ALLOWED_INPUT_ROOTS",
    ),
    ({"output_prefix": "/var/tmp/out"}, {}, "param output_prefix is a local path, and VQA_ALLOWED_OUTPUT_ROOTS is not set"),
    (
        {"output_prefix": "s3://other-team/out"},
        {"VQA_ALLOWED_OUTPUT_ROOTS": "s3://nowhere/out"},
        "param output_prefix lies outside the allowed roots",
    ),
    ({"media_root": "/home/"}, {}, "param media_root is a local path, and VQA_ALLOWED_MEDIA_ROOTS is not set"),
    ({"model": "/opt/models/private"}, {}, "param model must name a model"),
]


@pytest.mark.parametrize(("params", "env", "rule"), ATTACKS)
def test_the_plan_refuses_templates_and_locations_outside_the_roots(
    dagbag, monkeypatch: pytest.MonkeyPatch, params: dict, env: dict, rule: str
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9"
    )  # nothing answers there: a read would be a StorageError, not this
    dag = dagbag.dags["image_qa"]
    context = plan_context(
        dag,
        params={
            "input_uri": "s3://nowhere/in.jsonl",
            "output_prefix": "s3://nowhere/out",
            "media_root": "s3://nowhere/",
            **params,
        },
    )
    with pytest.raises(AirflowFailException, match=f"invalid parameters: {rule}") as err:
        run_plan(dag, context)
    # the message names the param and the rule; the value, which a template could have filled with a secret, is not in it
    assert not any(
        part in str(err.value) for part in ("conn.", "var.", "password", "range(", "/etc/", "/home/", "/opt/", "other-team")
    )


def test_the_plan_refuses_a_run_id_that_leaves_the_output_prefix(dagbag) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["image_qa"]
    context = {
        **plan_context(dag, params={"input_uri": "s3://nowhere/in.jsonl", "output_prefix": "s3://nowhere/out"}),
        "run_id": "..",
    }
    with pytest.raises(
        AirflowFailException, match=r"param output_prefix \(with the DAG id and run id\) has a '.' or '..' segment"
    ):
        run_plan(dag, context)


def test_with_roots_configured_local_locations_inside_them_pass(dagbag, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_text('{"image": "a.jpg"}\n')
    monkeypatch.setenv("VQA_ALLOWED_INPUT_ROOTS", str(tmp_path / "in"))
    monkeypatch.setenv("VQA_ALLOWED_OUTPUT_ROOTS", str(tmp_path / "out"))
    monkeypatch.setenv("VQA_ALLOWED_MEDIA_ROOTS", str(tmp_path / "in"))
    dag = dagbag.dags["image_qa"]
    params = {
        "input_uri": str(tmp_path / "in" / "rows.jsonl"),
        "output_prefix": str(tmp_path / "out"),
        "media_root": str(tmp_path / "in"),
    }
    shards = run_plan(dag, plan_context(dag, params=params))
    assert [(s["input"], s["rows"]) for s in shards] == [(str(tmp_path / "in" / "rows.jsonl"), 1)]


def test_progress_line_per_batch_counts_rate_tokens_eta_and_failures() -> None:
    progress = Progress("image_qa", total=100, batch=progress_batch(100, concurrency=320))
    assert progress.batch == 5  # a twentieth of the shard when that is smaller than the window
    lines = []
    for i in range(10):
        progress.add(
            Finished(error={"stage": "image_qa", "line": i + 1, "reason": "bad_image", "detail": "unreadable"})
            if i == 3
            else Finished(out={}),
            reused=i < 2,
        )
        if progress.due():
            lines.append(progress.line(Usage(requests=8, prompt_tokens=12_000, completion_tokens=800)))
    assert len(lines) == 2
    head, rest = lines[1].split(" rows/s, ")
    assert head.startswith("image_qa: 10/100 rows (10.0%), ") and float(head.rsplit(", ", 1)[1]) > 0
    assert rest.startswith("12,800 tokens (in 12,000, out 800), ETA ")
    assert rest.endswith("1 failed {'bad_image': 1}, 2 reused")
    progress.finished = 9  # eight rows in order and one ahead of them, checkpointed
    assert dataclasses.asdict(progress.snapshot()) == {
        "rows_total": 100,
        "rows_done": 10,
        "rows_finished": 9,
        "rows_reused": 2,
        "rows_failed": 1,
        "failures_by_reason": {"bad_image": 1},
    }
    assert progress_batch(None, concurrency=320) == 320 and progress_batch(10_000, concurrency=320) == 320


def test_the_retry_line_names_the_try_the_error_and_what_the_try_did() -> None:
    from vqa_operators.exceptions import ServerUnavailableError, TryProgress

    error = ServerUnavailableError("model server at http://vllm:8000/v1 unreachable\nTraceback ...")
    error.progress = TryProgress(
        rows_total=400, rows_done=150, rows_finished=120, rows_reused=40, rows_failed=3, failures_by_reason={"bad_image": 3}
    )
    ti = SimpleNamespace(dag_id="image_qa", task_id="generate", map_index=2, try_number=1, max_tries=3)
    line = summary({"ti": ti, "exception": error}, "failed, will retry")
    assert line == (
        "image_qa.generate[2] try 1 of 4 failed, will retry: ServerUnavailableError: model server at http://vllm:8000/v1 unreachable; "
        "160/400 rows finished (120 this try, 40 reused), 3 failed {'bad_image': 3}"
    )
    plain = summary(
        {
            "ti": SimpleNamespace(dag_id="d", task_id="merge", map_index=-1, try_number=4, max_tries=3),
            "exception": ValueError("x"),
        },
        "failed for good",
    )
    assert plain == "d.merge try 4 of 4 failed for good: ValueError: x"
    assert json.dumps(dataclasses.asdict(error.progress))  # the summary's counts are plain data, as the manifest's


def test_a_spec_reads_params_natively_and_refuses_one_the_dag_does_not_declare() -> None:
    from types import SimpleNamespace

    from vqa_operators.exceptions import ConfigError
    from vqa_operators.operators.spec import FromParam, WorkerSpec, from_params

    context = {"params": {"concurrency": 12, "pairs_per_row": 2, "model": None}, "ti": SimpleNamespace(try_number=3)}
    spec = WorkerSpec("image_qa", task_key="k", **from_params("concurrency", "model"), params=from_params("pairs_per_row"))
    values = spec.values(context)
    # as typed in the form: an int stays an int, an empty param is None (not given), never the text of a template
    assert (values["concurrency"], values["model"], values["params"], values["try_number"]) == (12, None, {"pairs_per_row": 2}, 3)
    with pytest.raises(ConfigError, match="'pairs_per_rows', which this DAG does not declare"):
        WorkerSpec("image_qa", task_key="k", params={"pairs_per_row": FromParam("pairs_per_rows")}).values(context)
    with pytest.raises(TypeError, match="max_workers is not a worker option"):
        WorkerSpec("image_qa", max_workers=4)
