"""Airflow operators that wrap the worker, and the factories that pick local or Kubernetes execution.

``VQA_EXECUTION`` (an environment variable of the dag-processor and workers) selects the mode:
``local`` (default) runs the worker inside the task process; ``kubernetes`` runs it in a pod (a GPU
pod only where vLLM runs in it). ``VQA_MODEL_SERVER=run`` gives each DAG run one model server of its
own, started by a setup task and stopped by a teardown task, that every worker task of the run
calls. Both are read when the DAG is parsed, not from Airflow Variables: that would be a metadata
lookup on every parse.
"""

from __future__ import annotations

from typing import Any, get_args

from vqa_operators import settings
from vqa_operators.operators.fanout import VQAMergeOperator, VQAShardPlanOperator
from vqa_operators.operators.local import VQAWorkerOperator
from vqa_operators.operators.model_server import (
    RUN_SERVER_URL,
    SETUP_TASK,
    TEARDOWN_TASK,
    VQAModelServerOperator,
    VQAStopModelServerOperator,
)
from vqa_operators.operators.placement import Placement, PodSettings
from vqa_operators.operators.spec import STAGED_OUTPUT_URI, FromParam, WorkerSpec, staged_output

MODES: tuple[str, ...] = get_args(settings.Environment.model_fields["execution"].annotation)

__all__ = [
    "MODES",
    "STAGED_OUTPUT_URI",
    "Placement",
    "PodSettings",
    "VQAMergeOperator",
    "VQAShardPlanOperator",
    "VQAWorkerOperator",
    "WorkerSpec",
    "execution_mode",
    "judge_and_merge",
    "merge_shards",
    "model_server",
    "quality_task",
    "shard_plan",
    "staged_output",
    "worker_task",
]


def execution_mode() -> str:
    """``VQA_EXECUTION`` from the environment, else ``local``."""
    return settings.environment().execution


def runs_own_server() -> bool:
    """``VQA_MODEL_SERVER=run``: each DAG run starts a model server of its own (setup/teardown tasks)."""
    return settings.environment().model_server == "run"


def pod_settings(pods: Placement | PodSettings | None, task_id: str) -> PodSettings | None:
    """The pod settings of ``task_id``: a Placement's for that task, or the one PodSettings given (None: the defaults)."""
    return pods.for_task(task_id) if isinstance(pods, Placement) else pods


def worker_task(
    *,
    task_id: str,
    spec: WorkerSpec,
    shards: Any = None,
    mode: str | None = None,
    pods: Placement | PodSettings | None = None,
    **kwargs: Any,
) -> Any:
    """The operator that runs ``spec``: in-process (local) or in a pod (kubernetes; ``pods`` places it).

    With ``shards`` (the plan task), one mapped task instance per shard: N pods, or N in-process
    tasks. The plan validates ``spec`` (it finds the specs of the tasks mapped over it) before it
    splits the input, so bad params fail there. With a run-scoped model server, the worker calls it.
    """
    mode = mode or execution_mode()
    if isinstance(shards, VQAShardPlanOperator):
        shards = shards.output
    if runs_own_server() and spec.get("base_url") is None:
        spec = spec.with_options(base_url=RUN_SERVER_URL)
    if mode == "kubernetes":
        from vqa_operators.operators.pod import VQAWorkerPodOperator

        cls: Any = VQAWorkerPodOperator
        kwargs["pod"] = pod_settings(pods, task_id)
    else:
        cls = VQAWorkerOperator
    if shards is None:
        return cls(task_id=task_id, spec=spec, **kwargs)
    return cls.partial(task_id=task_id, spec=spec, **kwargs).expand(shard=shards)


def model_server(
    plan: VQAShardPlanOperator, workers: list[Any], *, pods: Placement | PodSettings | None = None
) -> tuple[Any, Any]:
    """The run's model server around ``workers``: a setup task after ``plan`` (a bad param spends no GPU), a teardown after them.

    Airflow runs the teardown when the workers are done, failed or not, once the setup succeeded.
    """
    setup = VQAModelServerOperator(task_id=SETUP_TASK, model=FromParam("model"), pod=pod_settings(pods, SETUP_TASK))
    teardown = VQAStopModelServerOperator(task_id=TEARDOWN_TASK)
    plan >> setup
    for worker in workers:
        setup >> worker >> teardown
    teardown.as_teardown(setups=setup)
    return setup, teardown


def shard_plan(task_id: str = "plan") -> VQAShardPlanOperator:
    """The task that checks the run's params and splits its ``input_uri`` by ``rows_per_shard`` and ``max_shards`` (each read
    from the run's params as the form gave it: ``VQAShardPlanOperator``'s defaults)."""
    return VQAShardPlanOperator(task_id=task_id)


def quality_task(
    plan: VQAShardPlanOperator,
    *,
    source: str,
    after: str,
    params: dict[str, Any] | None = None,
    pods: Placement | PodSettings | None = None,
    **options: Any,
) -> Any:
    """The quality stage mapped over ``plan``: it judges the pairs ``source``'s task ``after`` staged for each shard.

    Its checks and thresholds come from the run's params (``quality_params``); ``params`` adds
    options (video: ``max_frames``), ``options`` adds worker options (as ``RUN_OPTIONS`` does).
    """
    from vqa_operators.operators.dag_config import QUALITY_OPTIONS

    spec = WorkerSpec(
        "quality", input=staged_output(after), params={"source": source, **QUALITY_OPTIONS, **(params or {})}, **options
    )
    return worker_task(task_id="quality", shards=plan, spec=spec, pods=pods)


def judge_and_merge(
    plan: VQAShardPlanOperator,
    stages: dict[str, Any],
    *,
    source: str,
    dataset: str,
    params: dict[str, Any] | None = None,
    pods: Placement | PodSettings | None = None,
    **options: Any,
) -> VQAMergeOperator:
    """The tail every DAG shares: near-duplicates dropped across the shards, the quality stage over what is left, then the merge.

    ``dedup`` drops the pairs whose text nearly repeats an earlier one's in the run before any is
    judged, so no duplicate costs a model call; the merge writes the exports and publishes
    ``dataset``'s asset, each from the run's params (``quality_params`` and ``export_params``, which the DAG must declare);
    the dataset keeps the last generation stage's name. ``pods`` places the quality pods as the
    DAG's others; with a run-scoped model server, its setup and teardown go around every worker
    task. ``params`` and ``options``: as ``quality_task``'s.
    """
    from vqa_operators.assets import dataset_asset
    from vqa_operators.merge import DEDUP_STAGE
    from vqa_operators.operators.dag_config import EXPORT, NEAR_DUPLICATES
    from vqa_operators.operators.fanout import VQADedupOperator
    from vqa_operators.operators.spec import STAGING_ROOT

    last = list(stages)[-1]
    dedup = VQADedupOperator(
        task_id=DEDUP_STAGE,
        upstream=stages[last].output,
        plan=plan.output,
        staging_root=STAGING_ROOT,
        near_duplicates=NEAR_DUPLICATES,
    )
    quality = quality_task(plan, source=source, after=DEDUP_STAGE, params=params, pods=pods, **options)
    dedup >> quality
    if runs_own_server():
        model_server(plan, [*stages.values(), quality], pods=pods)
    return merge_shards(
        {**stages, DEDUP_STAGE: dedup, "quality": quality}, plan, output=last, export=EXPORT, publishes=dataset_asset(dataset)
    )


def merge_shards(
    stages: dict[str, Any],
    plan: VQAShardPlanOperator,
    *,
    output: str | None = None,
    export: dict[str, Any] | None = None,
    publishes: Any = None,
    task_id: str = "merge",
) -> VQAMergeOperator:
    """The task that joins the mapped ``stages`` (in order; the last one's rows are the run's output).

    ``output``: the stage whose name the output takes (default the last; a quality gate after
    ``generate`` leaves the dataset at ``generate.jsonl``).
    ``export``: the training-ready copies to write (``records.ExportSettings`` fields; values may be
    templates), or None for none. ``publishes``: the dataset's Asset (``assets.dataset_asset``), announced when the merge succeeds.
    """
    return VQAMergeOperator(
        task_id=task_id,
        stages={name: task.output for name, task in stages.items()},
        output_uri=staged_output(output or list(stages)[-1]),
        plan=plan.output,
        media_root=FromParam("media_root"),
        export=export,
        requests_per_s=FromParam("estimate_requests_per_s"),
        outlets=[publishes] if publishes is not None else [],
    )
