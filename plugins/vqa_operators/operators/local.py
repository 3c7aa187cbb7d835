"""``VQAWorkerOperator``: runs the worker in the Airflow task's own process (the embedded default)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator

from vqa_operators.operators.spec import WorkerSpec


class VQAWorkerOperator(BaseOperator):
    """Run one generator in-process against the ``vqa_vlm`` model server; XCom gets the manifest only."""

    template_fields: Sequence[str] = ("spec",)
    ui_color = "#e8f4fd"

    def __init__(self, *, spec: WorkerSpec, vlm_conn_id: str = "vqa_vlm", aws_conn_id: str | None = "aws_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.vlm_conn_id = vlm_conn_id
        self.aws_conn_id = aws_conn_id

    @cached_property
    def s3_client(self) -> Any:
        """A boto3 S3 client from the ``aws_default`` connection (or the default AWS chain without one)."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.aws_conn_id).get_conn()

    def execute(self, context: Any) -> dict[str, Any]:
        """Run the worker and return its manifest."""
        from pydantic import ValidationError

        from vqa_operators.exceptions import ConfigError
        from vqa_operators.hooks.vlm import VLMHook
        from vqa_operators.parsing import describe_validation_error
        from vqa_operators.storage import Storage
        from vqa_operators.worker import JobOptions, run_job

        endpoint = VLMHook(self.vlm_conn_id).get_endpoint()
        spec = self.spec
        try:
            opts = JobOptions(
                **{**spec.options(), "model": spec.model or endpoint.model},
                base_url=endpoint.base_url,
                api_key=endpoint.api_key,
            )
        except ValidationError as err:
            raise ConfigError(f"bad options: {describe_validation_error(err)}") from None
        self.log.info("running %s in-process: %s -> %s", spec.generator, spec.input, spec.output)
        manifest = run_job(opts, storage=Storage(s3_client=self.s3_client if self.aws_conn_id else None))
        self.log.info("manifest: %s", manifest)
        return manifest
