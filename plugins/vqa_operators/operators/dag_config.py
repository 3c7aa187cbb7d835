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


# the worker options every task takes from the run's params (WorkerSpec keyword arguments)
RUN_OPTIONS: dict[str, Any] = {
    "model": "{{ params.model or '' }}",
    "media_root": "{{ params.media_root }}",
    "seed": "{{ params.seed }}",
    "concurrency": "{{ params.concurrency or '' }}",
}


# what a trigger-form param takes from an options model's JSON schema
_SCHEMA_KEYS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "pattern", "minLength", "maxLength")


def option_param(options: type[BaseModel], field: str, *, title: str, description: str | None = None, default: Any = ...) -> Param:
    """The trigger-form param of ``options``' ``field``: its default, type and bounds from the model, their one home.

    ``description``: what the form says (default: the field's own); ``default``: a DAG's own default, where it differs.
    """
    schema = _properties(options)[field]
    return Param(
        schema["default"] if default is ... else default, title=title, description=description or schema.get("description"),
        **{key: schema[key] for key in _SCHEMA_KEYS if key in schema},
    )


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
    return {"input_uri": f"{root}/raw/{dag_id}/{{{{ ds }}}}/input.jsonl", "output_prefix": f"{root}/output", "media_root": f"{root}/"}


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
        "model": Param(
            None,
            type=["null", "string"],
            title="Model",
            description=(
                "The served model's name (vLLM), or with VQA_BACKEND=transformers a Hub id or a local folder. "
                "Empty: the vqa_vlm connection's extra.model, else VQA_MODEL."
            ),
        ),
        "media_root": Param(
            defaults["media_root"],
            type=["null", "string"],
            pattern="^(s3://[a-z0-9.-]{3,63}/?.*|/.*)$",
            title="Media root",
            description="Folder or s3:// prefix that relative image paths are resolved against, within the deployment's allowed media roots. Default: VQA_DATA_ROOT.",
        ),
        "concurrency": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=4096,
            title="Requests in flight",
            description=(
                "Model requests each task keeps in flight. Empty: the server's batch size (VQA_MAX_NUM_SEQS, vLLM's --max-num-seqs, "
                f"{settings.MAX_NUM_SEQS} by default) and a quarter more, split between the run's shards, which share the server "
                "(a pod that starts its own vLLM keeps it all)."
            ),
        ),
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
            description="The model server's throughput to project the hours with (what it serves at full load). Empty: the rate the sample measured, which a small sample seldom reaches full load for: its hours are a ceiling.",
        ),
        "seed": Param(
            0,
            type="integer",
            minimum=0,
            title="Sampling seed",
            description="Per-row seeds (and choices such as pers_qa's question) derive from it, so reruns ask the same way.",
        ),
    }


def quality_params(*, near_duplicate_key: str = "question") -> dict[str, Param]:
    """The quality checks' switches and thresholds (the quality stage's and the merge's), documented for the trigger form.

    ``near_duplicate_key``: the default text the dedup task compares (pers_qa's questions come from a
    fixed bank, so it compares question and answer).
    """
    from vqa_operators.generators.quality import QualityOptions
    from vqa_operators.records import NearDuplicateSettings

    return {
        "blind_check": option_param(
            QualityOptions, "blind_check", title="Check: needs the picture",
            description="Ask each question without the images (video: with only its meta) and reject the pair (answerable_blind) if the model's blind answer agrees with the reference. 2 text-only model calls per pair.",
        ),
        "grounding_check": option_param(
            QualityOptions, "grounding_check", title="Check: grounded in the picture",
            description="Show the model the images (video: the sampled frames) with the pair; reject it (not_grounded) if judged not grounded or scored below the minimum. 1 call with the images per pair the first check kept.",
        ),
        "min_judge_score": option_param(
            QualityOptions, "min_judge_score", title="Lowest grounding score",
            description="Pairs the grounding check scores below this (1 contradicted ... 5 fully supported) are rejected as not_grounded.",
        ),
        "quality_mode": option_param(
            QualityOptions, "mode", title="What the checks do",
            description=(
                "filter: drop the pairs that fail a check (to the rejected file, with the reason). annotate: keep every pair, ask every "
                "check of each (3 calls a pair), and write its verdicts, score and would-be rejection into vqa_provenance.quality.verdicts, "
                "to filter later with your own threshold. Near-duplicates are dropped either way."
            ),
        ),
        "remove_near_duplicates": option_param(
            NearDuplicateSettings, "enabled", title="Remove near-duplicates",
            description="Across all shards, before any pair is judged (the dedup task): a pair whose question nearly repeats an earlier one's is rejected (near_duplicate); the first is kept. No model calls, and none spent judging duplicates.",
        ),
        "near_duplicate_threshold": option_param(
            NearDuplicateSettings, "threshold", title="Near-duplicate threshold",
            description="Jaccard similarity of character 3-grams (lower case, punctuation ignored) at or above which two questions are near-duplicates.",
        ),
        "near_duplicate_key": option_param(
            NearDuplicateSettings, "key", default=near_duplicate_key, title="Near-duplicates compare",
            description="question: the questions alone; question_answer: question and answer together (two pairs with one question and different answers are both kept).",
        ),
    }


# the quality stage's options from the run's params (the WorkerSpec ``params`` of a ``quality`` task; add ``source``)
QUALITY_OPTIONS: dict[str, Any] = {
    "blind_check": "{{ params.blind_check }}",
    "grounding_check": "{{ params.grounding_check }}",
    "min_judge_score": "{{ params.min_judge_score }}",
    "mode": "{{ params.quality_mode }}",
}

# the dedup task's near-duplicate settings from the run's params (VQADedupOperator's ``near_duplicates``)
NEAR_DUPLICATES: dict[str, Any] = {
    "enabled": "{{ params.remove_near_duplicates }}",
    "threshold": "{{ params.near_duplicate_threshold }}",
    "key": "{{ params.near_duplicate_key }}",
}


def export_params() -> dict[str, Param]:
    """The training-ready copies ``merge`` writes in the run's folder, documented for the trigger form."""
    from vqa_operators.export import DEFAULT_FORMATS, FORMATS, ExportSettings

    return {
        "export_formats": Param(
            list(DEFAULT_FORMATS),
            type="array",
            items={"type": "string", "enum": list(FORMATS)},
            uniqueItems=True,
            title="Export formats",
            description=(
                "Written in the run's folder, with a dataset card (README.md): hf (a Hub-ready folder: Parquet shards with the images and "
                "TRL's messages; datasets.load_dataset(folder)), sharegpt (LLaMA-Factory, registered in dataset_info.json), llava (LLaVA's "
                "conversation JSON), parquet (one flat file with the media's own URIs). Empty: the JSONL and the card only."
            ),
        ),
        "copy_media": option_param(
            ExportSettings, "copy_media", title="Copy media into the dataset",
            description="sharegpt and llava point at copies in the run's folder (media/<sha256>.<ext>), so the folder is a self-contained dataset; off: at the media's own URIs.",
        ),
        "embed_images": option_param(ExportSettings, "embed_images", title="Embed images in the flat Parquet", description="The parquet format only: each image's bytes too (datasets' Image feature), not only its URI. hf always embeds them."),
    }


def ingest_params() -> dict[str, Param]:
    """The video ingest's cuts, frames and texts (video_qa's first task, for rows that name a video file), documented for the trigger form."""
    from vqa_operators.generators.video_ingest import VideoIngestOptions

    return {
        "frames_per_clip": option_param(
            VideoIngestOptions, "frames_per_clip", title="Frames per clip",
            description="Video files: frames sampled evenly within each clip and stored as JPEG under the run's folder, each with its timestamp.",
        ),
        "scene_threshold": option_param(
            VideoIngestOptions, "scene_threshold", title="Scene-change threshold",
            description="How much the picture must change from one frame to the next (0-1, mean pixel change of a small thumbnail) to start a new clip. 0: cut every clip_s seconds.",
        ),
        "min_clip_s": option_param(VideoIngestOptions, "min_clip_s", title="Shortest clip (s)", description="A scene change sooner than this after the clip began is ignored."),
        "max_clip_s": option_param(VideoIngestOptions, "max_clip_s", title="Longest clip (s)", description="A longer scene is split into equal clips."),
        "clip_s": option_param(
            VideoIngestOptions, "clip_s", title="Fixed clip length (s)", description="A video with no scene change (or a threshold of 0) is cut into clips this long."
        ),
        "caption": option_param(
            VideoIngestOptions, "caption", title="Caption each clip", description="Ask the model for each clip's Description from its frames (1 request per clip). Off: empty."
        ),
        "transcribe": option_param(
            VideoIngestOptions, "transcribe", title="Transcribe each clip",
            description="Audio_Text from the speech-to-text endpoint VQA_TRANSCRIPTION_URL (vLLM serving Whisper): auto uses it if set, else leaves Audio_Text empty; on fails the run if none is set.",
        ),
    }


# the ingest's options from the run's params (the WorkerSpec ``params`` of a ``video_ingest`` task)
INGEST_OPTIONS: dict[str, Any] = {name: f"{{{{ params.{name} }}}}" for name in ("frames_per_clip", "scene_threshold", "min_clip_s", "max_clip_s", "clip_s", "caption", "transcribe")}

# the merge's export settings from the run's params (merge_shards' ``export``)
EXPORT: dict[str, Any] = {
    "formats": "{{ params.export_formats | join(',') }}",
    "copy_media": "{{ params.copy_media }}",
    "embed_images": "{{ params.embed_images }}",
}
