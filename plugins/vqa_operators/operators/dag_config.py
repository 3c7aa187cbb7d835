"""What every VQA DAG shares: schedule, retry policy, callbacks and the params a run is triggered with.

DAG files stay configuration: they take ``DAG_DEFAULTS`` and ``io_params`` and add their own
task-specific params. Every param is typed, titled and described, so the Airflow trigger form
explains itself; the form and the REST API reject values that break the schema before a run is
created, and the ``plan`` task checks what a schema cannot (templates, generator options)
before any model call.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.sdk import Param

from vqa_operators import settings
from vqa_operators.operators.callbacks import on_task_failure, on_task_retry
from vqa_operators.operators.spec import from_params
from vqa_operators.worker.options import JobOptions

if TYPE_CHECKING:
    from pydantic import BaseModel

START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")


def _schedule() -> str | None:
    """``VQA_SCHEDULE`` (a cron expression or preset; ``none`` for manual runs only), else ``@daily``."""
    value = settings.environment().schedule.strip()
    return None if value.lower() in ("", "none") else value


# Runs are date partitions: the scheduled run (and each backfill run) of a day reads the input_uri
# rendered with that day's logical date. Catchup is off: unpausing does not replay the past;
# `airflow backfill create` does, on request.
SCHEDULE = _schedule()

# Model-server and S3 hiccups the client's own retries could not absorb fail the task; Airflow
# retries it with growing delays (VQA_RETRY_DELAY_SECONDS sets the first). A retry resumes from the
# rows the failed try checkpointed, and rewrites the staged output at the same key.
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "vqa",
    "retries": 3,
    "retry_delay": timedelta(seconds=settings.environment().retry_delay_seconds),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    # one line in the task log saying which try failed, why, and what it had done
    "on_retry_callback": on_task_retry,
    "on_failure_callback": on_task_failure,
}

DAG_DEFAULTS: dict[str, Any] = {
    "start_date": START_DATE,
    "schedule": SCHEDULE,
    "catchup": False,
    "max_active_runs": 4,
    "default_args": DEFAULT_ARGS,
}


# the worker options every task takes from the run's params, by the same names (WorkerSpec options)
RUN_OPTIONS: dict[str, Any] = from_params("model", "media_root", "seed", "concurrency")


# what a trigger-form param takes from an options model's JSON schema
_SCHEMA_KEYS = (
    "type",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "items",
    "uniqueItems",
)


def option_param(options: type[BaseModel], field: str, *, default: Any = ..., **schema: Any) -> Param:
    """The trigger-form param of ``options``' ``field``, named as the field: its default, type, bounds, title and description
    from the model, their one home. ``default``: a DAG's own default, where it differs; ``schema``: what a DAG run requires
    beyond the option (an absolute ``pattern``, say)."""
    found = _schema(options, field)
    described = {"title": found.get("title") or field.replace("_", " ").capitalize(), "description": found.get("description")}
    own = options.model_fields[field].get_default(call_default_factory=True)
    return Param(
        own if default is ... else default, **{**described, **{key: found[key] for key in _SCHEMA_KEYS if key in found}, **schema}
    )


def option_params(options: type[BaseModel], *fields: str) -> dict[str, Param]:
    """``option_param`` of each of ``fields``, by name."""
    return {field: option_param(options, field) for field in fields}


def _schema(options: type[BaseModel], field: str) -> dict[str, Any]:
    """A field's JSON schema as a form shows it: ``T | None`` is one schema whose type lists ``"null"``; the model's own
    definitions inlined (a ``Literal`` list's items)."""
    schema = dict(_properties(options)[field])
    if "anyOf" in schema:
        branches = schema.pop("anyOf")
        kinds = [branch.get("type") for branch in branches]
        schema.update({k: v for branch in branches for k, v in branch.items() if k != "type"})
        schema["type"] = kinds if len(kinds) > 1 else kinds[0]
    return schema


@functools.cache
def _properties(options: type[BaseModel]) -> dict[str, Any]:
    """``options``' JSON schema's properties, made once per model (each DAG file asks for several of one model's fields)."""
    return options.model_json_schema()["properties"]


def data_defaults(dag_id: str) -> dict[str, str | None]:
    """The defaults of ``input_uri``, ``output_prefix`` and ``media_root``, all under ``VQA_DATA_ROOT``; None where it is not set.

    With none, a run must give the three itself, and ``plan`` says which setting would give them:
    a DAG never reads a bucket nobody configured.
    """
    root = (settings.environment().data_root or "").rstrip("/")
    if not root:
        return {"input_uri": None, "output_prefix": None, "media_root": None}
    return {
        "input_uri": f"{root}/raw/{dag_id}/{{{{ ds }}}}/input.jsonl",
        "output_prefix": f"{root}/output",
        "media_root": f"{root}/",
    }


def io_params(dag_id: str, *, rows_doc: str, final_task: str) -> dict[str, Param]:
    """The params every DAG shares (input, output, model, seed, sharding), documented for the trigger form."""
    defaults = data_defaults(dag_id)
    return {
        "input_uri": Param(
            defaults["input_uri"],
            type=["null", "string"],
            pattern="^(s3://[a-z0-9.-]{3,63}/.+|/.+)$",
            title="Input JSONL",
            description=(
                f"JSONL of rows with {rows_doc}: s3://bucket/key or an absolute path, within the deployment's allowed input roots. "
                "It may use the run's logical date, e.g. s3://bucket/raw/{{ ds }}/input.jsonl: each scheduled or backfilled run then reads "
                "its own day. The run's dates are the only placeholders ({{ ds }}, {{ ds_nodash }}, {{ ts }}, {{ ts_nodash }}, "
                "{{ ts_nodash_with_tz }}, {{ macros.ds_add(ds, -1) }}); params are data, never templates. "
                "A run triggered without a logical date needs a concrete path. Default: under VQA_DATA_ROOT."
            ),
        ),
        "output_prefix": Param(
            defaults["output_prefix"],
            type=["null", "string"],
            pattern="^(s3://[a-z0-9.-]{3,63}/?.*|/.*)$",
            title="Output prefix",
            description=(
                f"Folder or s3:// prefix, within the deployment's allowed output roots; the output lands at "
                f"<prefix>/{dag_id}/<run_id>/{final_task}.jsonl, with a manifest and errors file beside it. Default: under VQA_DATA_ROOT."
            ),
        ),
        "model": option_param(JobOptions, "model"),
        "media_root": option_param(
            JobOptions,
            "media_root",
            default=defaults["media_root"],
            type=["null", "string"],
            pattern="^(s3://[a-z0-9.-]{3,63}/?.*|/.*)$",
            description=f"{_schema(JobOptions, 'media_root')['description']} Default: VQA_DATA_ROOT.",
        ),
        "concurrency": option_param(JobOptions, "concurrency"),
        "rows_per_shard": Param(
            settings.ROWS_PER_SHARD,
            type="integer",
            minimum=1,
            title="Shard size (rows)",
            description="The input is split into shards of this many rows; each shard is one mapped task (one GPU pod in kubernetes mode).",
        ),
        "max_shards": Param(
            settings.MAX_SHARDS,
            type="integer",
            minimum=1,
            maximum=settings.MAX_SHARDS_LIMIT,
            title="Most shards",
            description="At most this many shards (parallel GPU tasks); a larger input gets larger shards.",
        ),
        "estimate_rows": Param(
            0,
            type="integer",
            minimum=0,
            title="Estimate from a sample (rows)",
            description=(
                "0: a real run over the whole input. N > 0: an estimate before the spend: only the input's first N rows go through "
                "every stage, and merge reports, in its log and the manifest's estimate, the model calls and prompt and completion "
                "tokens per row and per kept pair, the acceptance rate, and the projection for the whole input: calls, tokens, kept "
                "pairs and hours of the model server. The sample's files are written like a run's; its asset event says estimate, "
                "and dataset_ready skips it."
            ),
        ),
        "estimate_requests_per_s": Param(
            None,
            type=["null", "number"],
            exclusiveMinimum=0,
            title="Estimate at this throughput (requests/s)",
            description=(
                "The model server's throughput to project the hours with (what it serves at full load). Empty: "
                "the rate the sample measured, which a small sample seldom reaches full load for: its hours are a ceiling."
            ),
        ),
        "seed": option_param(JobOptions, "seed", default=0, type="integer"),
    }


def quality_params(*, near_duplicate_key: str = "question") -> dict[str, Param]:
    """The quality checks' switches and thresholds (the quality stage's and the merge's), documented for the trigger form.

    ``near_duplicate_key``: the default text the dedup task compares (pers_qa's questions come from a
    fixed bank, so it compares question and answer).
    """
    from vqa_operators.generators.quality import QualityOptions
    from vqa_operators.records import NearDuplicateSettings

    return {
        **option_params(QualityOptions, "blind_check", "grounding_check", "min_judge_score", "quality_mode"),
        **option_params(NearDuplicateSettings, "remove_near_duplicates", "near_duplicate_threshold"),
        "near_duplicate_key": option_param(NearDuplicateSettings, "near_duplicate_key", default=near_duplicate_key),
    }


# the quality stage's options from the run's params (the WorkerSpec ``params`` of a ``quality`` task; add ``source``)
QUALITY_OPTIONS: dict[str, Any] = from_params("blind_check", "grounding_check", "min_judge_score", "quality_mode")

# the dedup task's near-duplicate settings from the run's params (VQADedupOperator's ``near_duplicates``)
NEAR_DUPLICATES: dict[str, Any] = from_params("remove_near_duplicates", "near_duplicate_threshold", "near_duplicate_key")


def export_params() -> dict[str, Param]:
    """The training-ready copies ``merge`` writes in the run's folder, documented for the trigger form."""
    from vqa_operators.records import ExportSettings

    return option_params(ExportSettings, "export_formats", "copy_media", "embed_images")


def ingest_params() -> dict[str, Param]:
    """The video ingest's cuts, frames and texts (video_qa's first task, for rows that name a video file), documented for the trigger form."""
    from vqa_operators.generators.video_ingest import VideoIngestOptions

    return option_params(VideoIngestOptions, *INGEST_OPTIONS)


# the ingest's options from the run's params (the WorkerSpec ``params`` of a ``video_ingest`` task)
INGEST_OPTIONS: dict[str, Any] = from_params(
    "frames_per_clip", "scene_threshold", "min_clip_s", "max_clip_s", "clip_s", "caption", "transcribe"
)

# the merge's export settings from the run's params (merge_shards' ``export``)
EXPORT: dict[str, Any] = from_params("export_formats", "copy_media", "embed_images")
