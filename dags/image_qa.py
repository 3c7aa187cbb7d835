"""
### Image QA

Generates visual question-answer pairs for every row of a JSONL file of image paths
(`{"image": ["s3://bucket/a.jpg", ...]}`) with a vision-language model served by vLLM, and
writes `{"image": [...], "qa_pairs": [{"question", "answer"}, ...]}` rows to S3.

- **Input**: `input_uri`, a JSONL file (local path or `s3://`); relative image paths resolve
  against `media_root`.
- **Output**: `<output_prefix>/image_qa/<run_id>/generate.jsonl`, with rows that could not be
  processed in `generate.errors.jsonl` beside it (each with a reason). XCom holds only the
  manifest (row counts, output URIs, model, prompt hash).
- **Model**: the `vqa_vlm` connection (host = OpenAI-compatible base URL, password = API key,
  `extra.model`), or `VQA_BASE_URL` / `VQA_MODEL` / `VQA_API_KEY`.
- **Where it runs**: `VQA_EXECUTION=local` (in the task process) or `kubernetes` (GPU pod).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from vqa_operators.operators import WorkerSpec, worker_task


@dag(
    dag_id="image_qa",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    schedule=None,
    catchup=False,
    max_active_runs=4,
    doc_md=__doc__,
    tags=["vqa", "image_qa", "generation"],
    default_args={
        "owner": "vqa",
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    },
    params={
        "input_uri": Param(
            "s3://vqa-demo/input/image_qa.jsonl",
            type="string",
            minLength=1,
            title="Input JSONL",
            description="JSONL of rows with an `image` field (a path or a list of paths): local path or s3://bucket/key.",
        ),
        "output_prefix": Param(
            "s3://vqa-demo/output",
            type="string",
            pattern="^(s3://[a-z0-9.-]{3,63}/?.*|/.*)$",
            title="Output prefix",
            description="Folder or s3:// prefix; the output lands at <prefix>/image_qa/<run_id>/generate.jsonl.",
        ),
        "media_root": Param(
            ".",
            type="string",
            title="Media root",
            description="Folder or s3:// prefix that relative image paths are resolved against.",
        ),
        "pairs_per_row": Param(3, type="integer", minimum=1, maximum=20, title="QA pairs per row"),
        "seed": Param(0, type="integer", minimum=0, title="Sampling seed", description="Per-row seeds derive from it, so reruns ask the same way."),
    },
)
def image_qa() -> None:
    worker_task(
        task_id="generate",
        spec=WorkerSpec(
            generator="image_qa",
            input="{{ params.input_uri }}",
            media_root="{{ params.media_root }}",
            seed="{{ params.seed }}",
            params={"pairs_per_row": "{{ params.pairs_per_row }}"},
        ),
    )


image_qa()
