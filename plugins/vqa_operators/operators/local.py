"""``VQAWorkerOperator``: runs the worker in the Airflow task's own process (the embedded default)."""

from __future__ import annotations

import copy
import datetime as dt
import threading
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from vqa_operators.hooks.storage import s3_storage
from vqa_operators.operators.model_server import RUN_SERVER_URL, run_server_url
from vqa_operators.operators.spec import WorkerSpec, task_timeout


class VQAWorkerOperator(BaseOperator):
    """Run one generator in-process against the ``vqa_vlm`` model server; XCom gets the manifest only."""

    template_fields: Sequence[str] = ("spec",)
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        spec: WorkerSpec,
        shard: dict[str, Any] | None = None,
        vlm_conn_id: str = "vqa_vlm",
        aws_conn_id: str | None = "aws_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Airflow renders template fields in place, and mapped instances share partial()'s spec
        self.spec = copy.deepcopy(spec)
        # the run's own model server (VQA_MODEL_SERVER=run): its URL comes from the setup task, or the task fails
        self.calls_run_server = spec.get("base_url") == RUN_SERVER_URL
        self.shard = shard
        self.vlm_conn_id = vlm_conn_id
        self.aws_conn_id = aws_conn_id

    def pre_execute(self, context: Any) -> None:
        """The task's time limit, from its shard's size, unless the DAG set one (Airflow reads it after this, before ``execute``)."""
        if self.execution_timeout is None and (limit := task_timeout(self.shard)) is not None:
            self.execution_timeout = dt.timedelta(seconds=limit)

    def execute(self, context: Any) -> dict[str, Any]:
        """Run the worker and return its manifest."""
        from vqa_operators.hooks.vlm import VLMHook
        from vqa_operators.operators.failures import fail_fast
        from vqa_operators.worker import run_job
        from vqa_operators.worker.options import job_options
        from vqa_operators.worker.signals import STOP_SIGNALS

        spec = self.spec
        # the run's own model server (its URL in the spec), else the vqa_vlm connection's
        endpoint = VLMHook(self.vlm_conn_id).get_endpoint()
        ti = context["ti"]
        # another try would fail the same way on a bad option, an unreadable input ...: fail now, with the reason
        with fail_fast():
            values = spec.values(context)
            if self.calls_run_server:
                run_server_url(values.get("base_url"))
            opts = job_options(
                values,
                model=values.get("model") or endpoint.model,
                base_url=values.get("base_url") or endpoint.base_url,
                shard=self.shard,
                api_key=endpoint.api_key,
            )
            self.log.info(
                "try %s of %s: running %s in-process: %s -> %s",
                ti.try_number,
                ti.max_tries + 1,
                spec.generator,
                opts.input,
                opts.output,
            )
            # Airflow stops a task with SIGINT, then SIGTERM: either stops the run cleanly, its finished rows checkpointed
            stop_on = STOP_SIGNALS if threading.current_thread() is threading.main_thread() else ()
            manifest = run_job(opts, storage=s3_storage(self.aws_conn_id), stop_on=stop_on).dump()
        self.log.info("manifest: %s", manifest)
        return manifest
