"""DAG integrity: every DAG imports, has tags, retries and docs; DAG files and operators stay light to parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
HEAVY = ["vllm", "torch", "transformers", "PIL", "pandas", "boto3", "openai", "av", "pyarrow"]


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == {"image_qa", "pers_qa", "video_qa", "dataset_ready"}


@pytest.mark.parametrize("dag_id", ["image_qa", "pers_qa", "video_qa"])
def test_each_dag_publishes_its_dataset_as_an_asset_from_merge_only(dagbag, dag_id: str) -> None:
    from airflow.sdk import Asset

    dag = dagbag.dags[dag_id]
    assert dag.get_task("merge").outlets == [Asset(name=f"vqa.{dag_id}", group="vqa-datasets")]
    assert [t.task_id for t in dag.tasks if t.outlets] == ["merge"]


def test_the_consumer_is_scheduled_on_the_three_datasets_and_created_paused(dagbag) -> None:
    dag = dagbag.dags["dataset_ready"]
    assert type(dag.timetable.asset_condition).__name__ == "AssetAny"  # any one of them starts it
    assert {asset.name for asset in dag.timetable.asset_condition.objects} == {"vqa.image_qa", "vqa.pers_qa", "vqa.video_qa"}
    assert dag.is_paused_upon_creation is True
    assert dag.tags and "vqa" in dag.tags and dag.doc_md and all(t.retries >= 1 for t in dag.tasks)


def test_video_qa_is_ingest_then_three_chained_tasks_mapped_over_shards(dagbag) -> None:
    dag = dagbag.dags["video_qa"]
    assert [t.task_id for t in dag.topological_sort()] == [
        "plan",
        "ingest",
        "initial",
        "multiagent",
        "final",
        "dedup",
        "quality",
        "merge",
    ]
    assert dag.get_task("initial").upstream_task_ids == {"ingest", "plan"}
    assert dag.get_task("multiagent").upstream_task_ids == {"initial", "plan"}
    assert dag.get_task("final").upstream_task_ids == {"multiagent", "plan"}
    # near-duplicates leave across all the shards of final before any pair is judged
    assert dag.get_task("dedup").upstream_task_ids == {"final", "plan"} and dag.get_task("quality").upstream_task_ids == {
        "dedup",
        "plan",
    }
    # merge accounts for every stage's errors, the ingest's included
    assert dag.get_task("merge").upstream_task_ids == {"ingest", "initial", "multiagent", "final", "dedup", "quality", "plan"}
    assert dag.get_task("quality").partial_kwargs["spec"].get("params")["source"] == "video_qa_final"
    for task_id in ("ingest", "initial", "multiagent", "final", "quality"):
        assert dag.get_task(task_id).expand_input.value.keys() == {"shard"}  # one mapped instance per shard
    # the ingest reads the shard of the run's input; each later stage reads what the one before it staged for the same shard (map index)
    ingest = dag.get_task("ingest").partial_kwargs["spec"]
    assert ingest.generator == "video_ingest" and ingest.get("input") is None
    assert (
        set(ingest.get("params"))
        == {"frames_per_clip", "scene_threshold", "min_clip_s", "max_clip_s", "clip_s", "caption", "transcribe"}
        <= set(dag.params)
    )
    assert dag.get_task("initial").partial_kwargs["spec"].get("input").split("}}/")[-1].startswith("ingest{{")
    assert (
        dag.get_task("multiagent")
        .partial_kwargs["spec"]
        .get("input")
        .endswith("/initial{{ '/shard-%05d' % ti.map_index if ti.map_index is not none and ti.map_index >= 0 else '' }}.jsonl")
    )
    assert dag.get_task("final").partial_kwargs["spec"].get("input").split("}}/")[-1].startswith("multiagent{{")
    # every stage may read media the run staged (the ingest's frames), and only the run's own folder
    assert ingest.get("staging_root") == "{{ params.output_prefix.rstrip('/') }}/{{ dag.dag_id }}/{{ run_id }}"


@pytest.mark.parametrize("dag_id", ["image_qa", "pers_qa"])
def test_image_dags_plan_generate_judge_and_merge(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert [t.task_id for t in dag.topological_sort()] == ["plan", "generate", "dedup", "quality", "merge"]
    for task_id in ("generate", "quality"):
        assert dag.get_task(task_id).expand_input.value.keys() == {"shard"}
    # the quality stage judges what dedup left of its shard, not what generate staged; the dataset keeps generate's name
    quality = dag.get_task("quality").partial_kwargs["spec"]
    assert quality.generator == "quality" and quality.get("params")["source"] == dag_id
    assert quality.get("input").split("}}/")[-1].startswith("dedup{{")
    dedup = dag.get_task("dedup")
    assert (
        dedup.upstream_task_ids == {"generate", "plan"}
        and dedup.staging_root == "{{ params.output_prefix.rstrip('/') }}/{{ dag.dag_id }}/{{ run_id }}"
    )
    assert dag.get_task("merge").output_uri.endswith(
        "/generate{{ '/shard-%05d' % ti.map_index if ti.map_index is not none and ti.map_index >= 0 else '' }}.jsonl"
    )
    assert {"rows_per_shard", "max_shards"} <= set(dag.params)


@pytest.mark.parametrize("dag_id", ["image_qa", "pers_qa", "video_qa"])
def test_dag_conventions(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert dag.tags and "vqa" in dag.tags
    assert dag.doc_md and dag.catchup is False
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
        assert task.retry_exponential_backoff
    assert {"input_uri", "output_prefix"} <= set(dag.params)


@pytest.mark.parametrize("mode", ["local", "kubernetes"])
@pytest.mark.parametrize(
    "path", DAG_FILES + [ROOT / "plugins" / "vqa_operators" / "operators" / "__init__.py"], ids=lambda p: p.name
)
def test_parsing_imports_nothing_heavy(path: Path, mode: str) -> None:
    """Importing a DAG file (or the operator package) must not import model, image or data libraries, in either mode."""
    code = f"import runpy, sys; runpy.run_path({str(path)!r}); print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PYTHONPATH": str(ROOT / "plugins"),
            "PATH": "/usr/bin:/bin",
            "VQA_EXECUTION": mode,
            "AIRFLOW_HOME": "/tmp/vqa-parse-test",
        },
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1:] in ([], [""]), f"heavy modules imported: {proc.stdout}"


@pytest.mark.parametrize(("mode", "preloaded"), [("kubernetes", True), ("local", False), ("gpu", False)])
def test_airflow_local_settings_preloads_the_pod_operator_only_in_kubernetes_mode(mode: str, preloaded: bool) -> None:
    """Airflow imports ``airflow_local_settings`` (from plugins/) at start-up, before the dag-processor forks its parsers."""
    code = "import sys, airflow; print('airflow.providers.cncf.kubernetes.operators.pod' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "VQA_EXECUTION": mode,
            "AIRFLOW_HOME": "/tmp/vqa-parse-test",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        },
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(preloaded)
    if mode not in ("kubernetes", "local"):  # Airflow still starts, and says why nothing was preloaded
        assert (
            f"not preloading the pod operator: VQA_EXECUTION must be 'local' or 'kubernetes' (the execution), got {mode!r}"
            in proc.stderr
        )


def test_worker_task_leaves_the_plan_as_it_was_and_the_plan_finds_the_specs_downstream() -> None:

    from airflow.sdk import DAG

    from vqa_operators.operators import WorkerSpec, shard_plan, worker_task

    def holds_a_spec(value: object) -> bool:
        return isinstance(value, WorkerSpec) or (
            isinstance(value, list | tuple | set | dict)
            and any(holds_a_spec(v) for v in (value.values() if isinstance(value, dict) else value))
        )

    with DAG("plan_specs", schedule=None):
        plan = shard_plan()
        attributes = set(vars(plan))
        first = WorkerSpec(generator="image_qa")
        second = WorkerSpec(generator="pers_qa", input="s3://x/y.jsonl")
        worker_task(task_id="a", spec=first, shards=plan, mode="local")
        worker_task(task_id="b", spec=second, shards=plan, mode="local")
    # nothing was added to the plan: no new attribute, and no attribute holds a worker's spec (Airflow's own links to its downstream tasks aside)
    assert set(vars(plan)) == attributes
    assert not [name for name, value in vars(plan).items() if holds_a_spec(value)]
    assert plan.downstream_task_ids == {"a", "b"}
    # the plan finds them through its downstream tasks
    assert sorted(plan.worker_specs(), key=lambda spec: spec.generator) == [first, second]
