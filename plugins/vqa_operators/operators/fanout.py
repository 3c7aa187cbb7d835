"""The fan-out around the worker tasks: ``VQAShardPlanOperator`` splits the input, ``VQAMergeOperator`` joins the shards.

Both are I/O only (no model, no GPU) and stream, so they run in the Airflow worker in either
execution mode. The plan is a list of small dicts (byte ranges) that the worker task is mapped
over; the merge writes the run's final JSONL, errors and combined manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from vqa_operators.hooks.storage import s3_storage


class VQAShardPlanOperator(BaseOperator):
    """Split ``input`` into shards of ``rows_per_shard`` lines (at most ``max_shards``); return the plan."""

    template_fields: Sequence[str] = ("input", "rows_per_shard", "max_shards")
    ui_color = "#fdf6e3"

    def __init__(self, *, input: str, rows_per_shard: int | str, max_shards: int | str = 32, aws_conn_id: str | None = "aws_default", **kwargs: Any) -> None:  # noqa: A002 - the worker's option name
        super().__init__(**kwargs)
        self.input = input
        self.rows_per_shard = rows_per_shard
        self.max_shards = max_shards
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> list[dict[str, Any]]:
        """Read the input once and return one small dict per shard."""
        from vqa_operators.sharding import plan_shards

        plan = plan_shards(s3_storage(self.aws_conn_id), self.input, rows_per_shard=int(self.rows_per_shard), max_shards=int(self.max_shards))
        rows = sum(s.rows for s in plan)
        self.log.info("%s: %d rows in %d shard(s) of up to %d rows", self.input, rows, len(plan), max(s.rows for s in plan))
        return [s.model_dump() for s in plan]


class VQAMergeOperator(BaseOperator):
    """Concatenate each stage's shard outputs in order into ``output_uri`` (and errors files); return the combined manifest."""

    template_fields: Sequence[str] = ("stages", "output_uri", "plan")
    ui_color = "#e3fdec"

    def __init__(self, *, stages: dict[str, Any], output_uri: str, plan: Any, aws_conn_id: str | None = "aws_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stages = stages
        self.output_uri = output_uri
        self.plan = plan
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        """Merge, check every input row is accounted for, and write the manifest beside the output."""
        from vqa_operators.sharding import merge_run

        stages = {name: list(manifests) for name, manifests in self.stages.items()}
        manifest = merge_run(s3_storage(self.aws_conn_id), stages, output=self.output_uri, plan=list(self.plan))
        self.log.info(
            "merged %d shard(s): %d rows in, %d out, %d failed %s -> %s",
            manifest["shards"], manifest["rows_in"], manifest["rows_out"], manifest["rows_failed"], manifest["failures_by_reason"], manifest["output"],
        )
        return manifest
