"""
### Personalised QA

Asks one question per row about the row's main character, who is called by a tag (default
`<mam>`), and writes `{"image": [...], "pers_qa": "Question: ... <mam> ... Answer: <mam> ..."}`.
The question comes from the bank in `include/prompts/pers_qa/questions.j2`, chosen from the seed
and the row, so a rerun asks the same question. An optional `subject_type` field (`person`,
`pet` or `object`) widens the choice to questions that suit that kind of main character.

- **Input**: `input_uri`, JSONL rows with `image` (a path or a list of paths of the same main
  character); relative paths resolve against `media_root`.
- **Output**: `<output_prefix>/pers_qa/<run_id>/generate.jsonl`, failed rows with a reason in
  `generate.errors.jsonl` (for example `answer_missing_tag` when the model would not start its
  answer with the tag even after a repair request). XCom holds only the manifest.
- **Fan-out**: `plan` splits the input into shards of `rows_per_shard` rows (at most
  `max_shards`), `generate` and `quality` run once per shard (mapped), `dedup` between them
  across all shards, `merge` joins them in
  order and writes `generate.manifest.json`. Shards stage at `<task>/shard-<map index>.jsonl`.
- **Quality**: `quality` (mapped per shard) judges every pair: asked without the images, is it
  answered anyway (`answerable_blind`)? Shown the images, is it grounded, with a score of at
  least `min_judge_score` (`not_grounded`)? `dedup` removes near-duplicate question-answer
  pairs across shards (`near_duplicate`) before `quality` judges any. Rejected pairs, and rows left with none, go to
  `generate.rejected.jsonl` with their reason and verdicts; params switch each check.
- **Model**: the `vqa_vlm` connection, or `VQA_BASE_URL` / `VQA_MODEL` / `VQA_API_KEY`.
- **Where it runs**: `VQA_EXECUTION=local` (in the task process) or `kubernetes` (GPU pod).
- **Published** as the asset `vqa.pers_qa`: each successful run's event
  carries its counts and URIs, and downstream DAGs schedule on it (see `dags/dataset_ready.py`).
"""

from __future__ import annotations

from airflow.sdk import dag

from vqa_operators.generators.pers_qa import PersQAOptions
from vqa_operators.operators import Placement, WorkerSpec, judge_and_merge, shard_plan, worker_task
from vqa_operators.operators.dag_config import DAG_DEFAULTS, RUN_OPTIONS, export_params, io_params, option_param, quality_params
from vqa_operators.operators.spec import from_params

# kubernetes mode: where this DAG's worker pods run, and what they carry (placement.PodSettings), for every
# task or per task id, e.g. Placement(default=PodSettings(s3_secret=None, service_account_name="vqa-worker"),
# tasks={"ingest": {"cpu": "8", "tmp_size": "200Gi"}})
PODS = Placement()


@dag(
    dag_id="pers_qa",
    doc_md=__doc__,
    tags=["vqa", "pers_qa", "generation"],
    **DAG_DEFAULTS,
    params={
        **io_params(
            "pers_qa",
            rows_doc="an `image` field (paths of one main character) and optionally `subject_type`",
            final_task="generate",
        ),
        **export_params(),
        **quality_params(near_duplicate_key="question_answer"),
        "tag": option_param(PersQAOptions, "tag"),
    },
)
def pers_qa() -> None:
    plan = shard_plan()
    generate = worker_task(
        task_id="generate",
        shards=plan,
        pods=PODS,
        spec=WorkerSpec(
            generator="pers_qa",
            **RUN_OPTIONS,
            params=from_params("tag"),
        ),
    )
    judge_and_merge(plan, {"generate": generate}, source="pers_qa", dataset="pers_qa", pods=PODS, **RUN_OPTIONS)


pers_qa()
