"""
### Smoke test of a Kubernetes install (`VQA_EXECUTION=kubernetes`)

Run it once on a new cluster, before the DAGs go to users: trigger `vqa_smoke` in the UI (or
`airflow dags test vqa_smoke` in the scheduler's pod). It starts one pod per topology, placed,
sized and locked down as the workers' pods are, and runs image_qa on a sample:

- `cpu_pod`: the worker image, as a pod that calls the model service;
- `gpu_pod`: the vLLM image, as a pod that runs vLLM: a GPU, on a GPU node, with the model cache;
- each checks that it runs as UID 2000 on a read-only root, writes, reads back and deletes an object
  under `VQA_DATA_ROOT`, reaches the model server with the API key (where one is configured),
  can write the model cache, and sees the GPU it requested;
- `sample`, then `plan` ... `merge`: image_qa's tasks on a sample of 4 rows it writes under
  `VQA_DATA_ROOT/raw/vqa_smoke/`, as an estimate (`estimate_rows`);
- `report` prints a verdict per check (PASS, FAIL, SKIP with why) and fails if one failed.

`expect_gpu` off reports a missing GPU without failing (a cluster with no GPU nodes, or the
container tier in CI, where no device exists).
"""

from __future__ import annotations

from airflow.sdk import DAG, Param

from vqa_operators.operators import Placement, WorkerSpec, execution_mode, judge_and_merge, shard_plan, worker_task
from vqa_operators.operators.dag_config import DAG_DEFAULTS, RUN_OPTIONS, data_defaults, export_params, io_params, quality_params
from vqa_operators.operators.spec import FromParam

PODS = Placement()

if execution_mode() == "kubernetes":
    from vqa_operators.operators.smoke import (
        SAMPLE_FOLDER,
        SAMPLE_ROWS,
        VQASmokePodOperator,
        VQASmokeReportOperator,
        VQASmokeSampleOperator,
    )

    defaults = data_defaults("vqa_smoke")
    root = (defaults["media_root"] or "").rstrip("/")
    params = {
        **io_params("vqa_smoke", rows_doc="an `image` field", final_task="generate"),
        **export_params(),
        **quality_params(),
        "expect_gpu": Param(
            True,
            type="boolean",
            title="A GPU is required",
            description="Off: a GPU pod without a GPU device is reported, not failed.",
        ),
    }
    params["input_uri"] = Param(
        f"{root}/{SAMPLE_FOLDER}/input.jsonl" if root else None,
        type=["null", "string"],
        title="Input JSONL",
        description="The sample the DAG writes.",
    )
    params["estimate_rows"] = Param(
        SAMPLE_ROWS,
        type="integer",
        minimum=1,
        title="Estimate from a sample (rows)",
        description="image_qa's estimate over this many rows.",
    )
    with DAG(
        dag_id="vqa_smoke",
        doc_md=__doc__,
        tags=["vqa", "maintenance"],
        params=params,
        **{
            **DAG_DEFAULTS,
            "schedule": None,
            "max_active_runs": 1,
            "default_args": {**DAG_DEFAULTS["default_args"], "retries": 0},
        },
    ):
        probes = f"{defaults['output_prefix'].rstrip('/')}/vqa_smoke" if defaults["output_prefix"] else ""
        pods = [
            VQASmokePodOperator(
                task_id="cpu_pod", gpu=False, data_root=probes, expect_gpu=FromParam("expect_gpu"), pod=PODS.for_task("cpu_pod")
            ),
            VQASmokePodOperator(
                task_id="gpu_pod", gpu=True, data_root=probes, expect_gpu=FromParam("expect_gpu"), pod=PODS.for_task("gpu_pod")
            ),
        ]
        sample = VQASmokeSampleOperator(task_id="sample", folder=f"{root}/{SAMPLE_FOLDER}" if root else None)
        plan = shard_plan()
        sample >> plan
        generate = worker_task(
            task_id="generate",
            shards=plan,
            pods=PODS,
            spec=WorkerSpec(generator="image_qa", **RUN_OPTIONS, params={"pairs_per_row": 2}),
        )
        merge = judge_and_merge(plan, {"generate": generate}, source="image_qa", dataset="vqa_smoke", pods=PODS, **RUN_OPTIONS)
        report = VQASmokeReportOperator(task_id="report", pods=[p.task_id for p in pods], merge=merge.task_id)
        [*pods, merge] >> report
