"""What every VQA DAG shares: retry policy and the input/output params a run is triggered with.

DAG files stay configuration: they take these and add their own task-specific params.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param

from vqa_operators.sharding import MAX_SHARDS

START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")

# Model-server and S3 hiccups the client's own retries could not absorb fail the task; Airflow
# retries it with growing delays (VQA_RETRY_DELAY_SECONDS sets the first). A retry resumes from the
# rows the failed try checkpointed, and rewrites the staged output at the same key.
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "vqa",
    "retries": 3,
    "retry_delay": timedelta(seconds=float(os.environ.get("VQA_RETRY_DELAY_SECONDS", "60"))),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
}


def io_params(dag_id: str, *, example_input: str, rows_doc: str, final_task: str) -> dict[str, Param]:
    """``input_uri``, ``output_prefix``, ``media_root`` and ``seed``, documented for the trigger form."""
    return {
        "input_uri": Param(
            example_input,
            type="string",
            minLength=1,
            title="Input JSONL",
            description=f"JSONL of rows with {rows_doc}: a local path or s3://bucket/key.",
        ),
        "output_prefix": Param(
            "s3://vqa-demo/output",
            type="string",
            pattern="^(s3://[a-z0-9.-]{3,63}/?.*|/.*)$",
            title="Output prefix",
            description=f"Folder or s3:// prefix; the output lands at <prefix>/{dag_id}/<run_id>/{final_task}.jsonl, with a manifest and errors file beside it.",
        ),
        "media_root": Param(
            ".",
            type="string",
            title="Media root",
            description="Folder or s3:// prefix that relative image paths are resolved against.",
        ),
        "concurrency": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=4096,
            title="Requests in flight",
            description=(
                "Model requests each task keeps in flight. Empty: the server's batch size (VQA_MAX_NUM_SEQS, vLLM's --max-num-seqs, "
                "256 by default) and a quarter more. Tasks sharing one server should split it between them."
            ),
        ),
        "rows_per_shard": Param(
            10_000,
            type="integer",
            minimum=1,
            title="Rows per shard",
            description="The input is split into shards of this many rows; each shard is one mapped task (one GPU pod in kubernetes mode).",
        ),
        "max_shards": Param(
            16,
            type="integer",
            minimum=1,
            maximum=MAX_SHARDS,
            title="Most shards",
            description="At most this many shards (parallel GPU tasks); a larger input gets larger shards.",
        ),
        "seed": Param(
            0,
            type="integer",
            minimum=0,
            title="Sampling seed",
            description="Per-row seeds (and choices such as pers_qa's question) derive from it, so reruns ask the same way.",
        ),
    }
