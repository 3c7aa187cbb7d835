"""One mapping from the job errors to Airflow's fail-fast, in every operator: what no retry can fix fails the task at once."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/vqa-failures-test")

from vqa_operators.exceptions import (
    FAIL_WITHOUT_RETRY,
    ConfigError,
    ExportError,
    InputError,
    ServerUnavailableError,
    StorageError,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("error", [ConfigError("bad"), InputError("gone"), ExportError("damaged")])
def test_what_no_retry_can_fix_fails_at_once(error: Exception) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from vqa_operators.operators.failures import fail_fast

    with pytest.raises(AirflowFailException, match=f"{type(error).__name__}: {error}") as failed, fail_fast():
        raise error
    assert failed.value.__cause__ is error


@pytest.mark.parametrize("error", [StorageError("slow down"), ServerUnavailableError("down"), RuntimeError("a bug")])
def test_the_rest_propagates_for_airflow_to_retry(error: Exception) -> None:
    from vqa_operators.operators.failures import fail_fast

    with pytest.raises(type(error)), fail_fast():
        raise error


def test_a_pods_exit_code_maps_to_the_same_errors() -> None:
    from vqa_operators.operators.failures import final_error_for_exit_code

    assert [final_error_for_exit_code(code) for code in (2, 3)] == [ConfigError, InputError]
    assert all(final_error_for_exit_code(code) is None for code in (0, 1, 4, 5, 130, 143, None))
    assert {cls.exit_code for cls in FAIL_WITHOUT_RETRY} == {2, 3}


def test_plan_fails_at_once_on_a_missing_input(s3, bucket: str) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException

    from tests.operators.test_params import plan_context, run_plan

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["image_qa"]
    with pytest.raises(AirflowFailException, match=rf"InputError: cannot read s3://{bucket}/nothing\.jsonl: it does not exist"):
        run_plan(dag, plan_context(dag, params={"input_uri": f"s3://{bucket}/nothing.jsonl"}))


def test_merge_fails_at_once_when_the_shards_do_not_account_for_the_input(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from vqa_operators.operators import VQAMergeOperator

    plan = [{"input": "in.jsonl", "index": i, "first_line": 1 + 2 * i, "rows": 2, "start": 0, "end": 1} for i in range(2)]
    shard = {
        "generator": "image_qa",
        "input": "in.jsonl",
        "shard": 0,
        "output": str(tmp_path / "s0.jsonl"),
        "errors": None,
        "rows_in": 2,
        "rows_out": 2,
        "rows_failed": 0,
        "duration_s": 1.0,
    }
    merge = VQAMergeOperator(
        task_id="merge", stages={"generate": [shard]}, output_uri=str(tmp_path / "generate.jsonl"), plan=plan, aws_conn_id=None
    )
    context = {"dag": SimpleNamespace(dag_id="image_qa"), "run_id": "r", "outlet_events": {}}
    with pytest.raises(AirflowFailException, match="InputError: stage generate has 1 shard results for 2 shards"):
        merge.execute(context)
    # a shard result that is not a stage manifest (a task of another version, a hand-edited XCom) is named, not a traceback
    merge.stages = {"generate": [shard, {"shard": 1, "rows_out": 2}]}
    with pytest.raises(
        AirflowFailException, match="InputError: shard result 1 of stage generate is not a stage manifest: .*rows_in"
    ):
        merge.execute(context)
    assert not list(tmp_path.iterdir())  # all or nothing


def test_merge_fails_at_once_on_bad_export_settings(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from vqa_operators.operators import VQAMergeOperator

    merge = VQAMergeOperator(
        task_id="merge",
        stages={},
        output_uri=str(tmp_path / "g.jsonl"),
        plan=[],
        export={"export_formats": ["csv"]},
        aws_conn_id=None,
    )
    with pytest.raises(AirflowFailException, match="ConfigError: invalid export parameters: export_formats"):
        merge.execute({"dag": SimpleNamespace(dag_id="image_qa"), "run_id": "r"})
