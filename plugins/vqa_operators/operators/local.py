"""``VQAWorkerOperator``: runs the worker in the Airflow task's own process (the embedded default)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from vqa_operators.hooks.storage import s3_storage
from vqa_operators.operators.spec import WorkerSpec


class VQAWorkerOperator(BaseOperator):
    """Run one generator in-process against the ``vqa_vlm`` model server; XCom gets the manifest only."""

    template_fields: Sequence[str] = ("spec",)
    ui_color = "#e8f4fd"

    def __init__(
        self, *, spec: WorkerSpec, shard: dict[str, Any] | None = None, vlm_conn_id: str = "vqa_vlm", aws_conn_id: str | None = "aws_default", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        # Airflow renders template fields in place, and mapped instances share partial()'s spec
        self.spec = copy.deepcopy(spec)
        self.shard = shard
        self.vlm_conn_id = vlm_conn_id
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        """Run the worker and return its manifest."""
        from airflow.sdk.exceptions import AirflowFailException
        from pydantic import ValidationError

        from vqa_operators.exceptions import FAIL_WITHOUT_RETRY
        from vqa_operators.hooks.vlm import VLMHook
        from vqa_operators.parsing import describe_validation_error
        from vqa_operators.worker import JobOptions, run_job
        from vqa_operators.worker.run_loop import STOP_SIGNALS

        endpoint = VLMHook(self.vlm_conn_id).get_endpoint()
        spec = self.spec
        try:
            opts = JobOptions(
                **{**spec.options(), "model": spec.model or endpoint.model},
                shard=self.shard,
                base_url=endpoint.base_url,
                api_key=endpoint.api_key,
            )
        except ValidationError as err:
            raise AirflowFailException(f"bad options: {describe_validation_error(err)}") from None
        ti = context["ti"]
        self.log.info("try %s of %s: running %s in-process: %s -> %s", ti.try_number, ti.max_tries + 1, spec.generator, opts.input, opts.output)
        try:
            # Airflow stops a task with SIGINT, then SIGTERM: either stops the run cleanly, its finished rows checkpointed
            stop_on = STOP_SIGNALS if threading.current_thread() is threading.main_thread() else ()
            manifest = run_job(opts, storage=s3_storage(self.aws_conn_id), stop_on=stop_on)
        except FAIL_WITHOUT_RETRY as err:
            # another try would fail the same way: fail now, with the reason, instead of retrying
            raise AirflowFailException(f"{type(err).__name__}: {err}") from err
        self.log.info("manifest: %s", manifest)
        return manifest
