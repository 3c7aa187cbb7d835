"""
### Run-server janitor (kubernetes mode, `VQA_MODEL_SERVER=run`)

Every hour, deletes this installation's run-scoped model servers (a Deployment and a Service each,
holding a GPU) that no run needs any more: their run ended or was deleted in the UI without its
teardown, or they outlived `VQA_RUN_SERVER_MAX_HOURS`. A server whose run is queued or running is
never touched, nor one of another installation (`VQA_INSTALLATION`). Its return value lists what
it deleted and kept, and why.

It exists only where run servers do: `VQA_EXECUTION=kubernetes` and `VQA_MODEL_SERVER=run`.
"""

from __future__ import annotations

from airflow.sdk import DAG

from vqa_operators.operators import execution_mode, runs_own_server
from vqa_operators.operators.dag_config import DAG_DEFAULTS
from vqa_operators.operators.model_server import VQAJanitorOperator

if execution_mode() == "kubernetes" and runs_own_server():
    with DAG(
        dag_id="vqa_janitor",
        doc_md=__doc__,
        tags=["vqa", "maintenance"],
        **{**DAG_DEFAULTS, "schedule": "@hourly", "max_active_runs": 1},
    ):
        VQAJanitorOperator(task_id="delete_idle_run_servers")
