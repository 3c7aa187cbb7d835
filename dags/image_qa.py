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
- **Fan-out**: `plan` splits the input into shards of `rows_per_shard` rows (at most
  `max_shards`), `generate` and `quality` run once per shard (mapped), `dedup` between them
  across all shards, `merge` joins them in
  order and writes `generate.manifest.json`. Shards stage at `<task>/shard-<map index>.jsonl`.
- **Quality**: `quality` (mapped per shard) judges every pair: asked without the images, is it
  answered anyway (`answerable_blind`)? Shown the images, is it grounded, with a score of at
  least `min_judge_score` (`not_grounded`)? `dedup` removes near-duplicate questions
  across shards (`near_duplicate`) before `quality` judges any. Rejected pairs, and rows left with none, go to
  `generate.rejected.jsonl` with their reason and verdicts; params switch each check.
- **Model**: the `vqa_vlm` connection (host = OpenAI-compatible base URL, password = API key,
  `extra.model`), or `VQA_BASE_URL` / `VQA_MODEL` / `VQA_API_KEY`.
- **Where it runs**: `VQA_EXECUTION=local` (in the task process) or `kubernetes` (GPU pod).
- **Published** as the asset `vqa.image_qa`: each successful run's event
  carries its counts and URIs, and downstream DAGs schedule on it (see `dags/dataset_ready.py`).
"""

from __future__ import annotations

from airflow.sdk import dag

from vqa_operators.generators.image_qa import ImageQAOptions
from vqa_operators.operators import Placement, WorkerSpec, judge_and_merge, shard_plan, worker_task
from vqa_operators.operators.dag_config import DAG_DEFAULTS, RUN_OPTIONS, export_params, io_params, option_param, quality_params
from vqa_operators.operators.spec import from_params

# kubernetes mode: where this DAG's worker pods run, and what they carry (placement.PodSettings), for every
# task or per task id, e.g. Placement(default=PodSettings(s3_secret=None, service_account_name="vqa-worker"),
# tasks={"ingest": {"cpu": "8", "tmp_size": "200Gi"}})
PODS = Placement()


@dag(
    dag_id="image_qa",
    doc_md=__doc__,
    tags=["vqa", "image_qa", "generation"],
    **DAG_DEFAULTS,
    params={
        **io_params(
            "image_qa",
            rows_doc="an `image` field (a path or a list of paths)",
            final_task="generate",
        ),
        **export_params(),
        **quality_params(),
        "pairs_per_row": option_param(ImageQAOptions, "pairs_per_row"),
    },
)
def image_qa() -> None:
    plan = shard_plan()
    generate = worker_task(
        task_id="generate",
        shards=plan,
        pods=PODS,
        spec=WorkerSpec(
            generator="image_qa",
            **RUN_OPTIONS,
            params=from_params("pairs_per_row"),
        ),
    )
    judge_and_merge(plan, {"generate": generate}, source="image_qa", dataset="image_qa", pods=PODS, **RUN_OPTIONS)


image_qa()
