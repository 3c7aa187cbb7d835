"""The fan-out around the worker tasks: ``VQAShardPlanOperator`` splits the input, ``VQAMergeOperator`` joins the shards.

Both are I/O only (no model, no GPU) and stream, so they run in the Airflow worker in either
execution mode. The plan is a list of small dicts (byte ranges) that the worker task is mapped
over; the merge writes the run's final JSONL, errors and combined manifest.
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink

from vqa_operators import settings
from vqa_operators.hooks.storage import s3_storage
from vqa_operators.operators.spec import WorkerSpec


class VQAShardPlanOperator(BaseOperator):
    """Check the run's parameters, split ``input`` into shards of ``rows_per_shard`` lines (at most ``max_shards``); return the plan.

    ``input`` may hold a template of its own (``{{ ds }}`` in the ``input_uri`` param): it is
    rendered here with the run's context, and the shards carry the rendered URI to the workers.
    The worker specs of the tasks mapped over this plan are validated here (rendered with this
    run's params), before any model call: a bad parameter fails this task at once, without
    retries, with the reason.
    """

    template_fields: Sequence[str] = ("input", "rows_per_shard", "max_shards")
    ui_color = "#fdf6e3"

    def __init__(self, *, input: str, rows_per_shard: int | str, max_shards: int | str = settings.MAX_SHARDS, aws_conn_id: str | None = "aws_default", **kwargs: Any) -> None:  # noqa: A002 - the worker's option name
        super().__init__(**kwargs)
        self.input = input
        self.rows_per_shard = rows_per_shard
        self.max_shards = max_shards
        self.aws_conn_id = aws_conn_id

    def worker_specs(self) -> list[WorkerSpec]:
        """The specs of the worker tasks downstream of this plan (mapped over it, or not)."""
        specs = []
        for task in self.get_direct_relatives(upstream=False):
            partial = getattr(task, "partial_kwargs", None)
            spec = partial.get("spec") if isinstance(partial, dict) else getattr(task, "spec", None)
            if isinstance(spec, WorkerSpec):
                specs.append(spec)
        return specs

    def _input(self, context: Any) -> str:
        """``input`` with the run's dates filled in (the param's own template, e.g. ``{{ ds }}``)."""
        import jinja2
        from airflow.sdk.exceptions import AirflowFailException

        try:
            return self.render_template(self.input, context) if "{{" in self.input or "{%" in self.input else self.input
        except jinja2.UndefinedError as err:
            raise AirflowFailException(
                f"input_uri {self.input!r} cannot be rendered: {err}. A run triggered without a logical date has no ds; "
                "give input_uri a concrete path, or trigger the run with a logical date"
            ) from None
        except jinja2.TemplateError as err:
            raise AirflowFailException(f"input_uri {self.input!r} is not a valid template: {err}") from None

    def execute(self, context: Any) -> list[dict[str, Any]]:
        """Validate the parameters, read the input once and return one small dict per shard."""
        from airflow.sdk.exceptions import AirflowFailException

        from vqa_operators.exceptions import ConfigError
        from vqa_operators.sharding import plan_shards
        from vqa_operators.worker import validate_spec

        input_uri = self._input(context)
        try:
            for spec in self.worker_specs():
                # rendered as the worker task will render it, on a copy: the DAG's spec stays as written
                rendered = self.render_template(copy.deepcopy(spec), context)
                validate_spec(rendered.options(), input_uri)
        except ConfigError as err:
            raise AirflowFailException(f"invalid parameters: {err}") from None
        plan = plan_shards(s3_storage(self.aws_conn_id), input_uri, rows_per_shard=int(self.rows_per_shard), max_shards=int(self.max_shards))
        rows = sum(s.rows for s in plan)
        self.log.info("%s: %d rows in %d shard(s) of up to %d rows", input_uri, rows, len(plan), max(s.rows for s in plan))
        return [s.model_dump() for s in plan]


class QAPreviewLink(BaseOperatorLink):
    """The merge task's "QA preview" button: the presigned URL of the run's HTML preview."""

    name = "QA preview"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        """Called in the worker once the task ends (Airflow stores the link in XCom); empty if no preview was written."""
        return getattr(operator, "preview_url", None) or ""


class VQAMergeOperator(BaseOperator):
    """Concatenate each stage's shard outputs in order into ``output_uri`` (and errors files), write the QA preview; return the combined manifest."""

    template_fields: Sequence[str] = ("stages", "output_uri", "plan", "media_root", "near_duplicates", "export")
    ui_color = "#e3fdec"
    operator_extra_links = (QAPreviewLink(),)

    def __init__(
        self,
        *,
        stages: dict[str, Any],
        output_uri: str,
        plan: Any,
        media_root: str = ".",
        near_duplicates: dict[str, Any] | None = None,
        export: dict[str, Any] | None = None,
        aws_conn_id: str | None = "aws_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stages = stages
        self.near_duplicates = near_duplicates
        self.export = export
        self.output_uri = output_uri
        self.plan = plan
        self.media_root = media_root
        self.aws_conn_id = aws_conn_id
        self.preview_url: str | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        """Merge, check every input row is accounted for, write the manifest and the preview beside the output."""
        from airflow.sdk.exceptions import AirflowFailException
        from pydantic import ValidationError

        from vqa_operators.export import ExportSettings, export_run
        from vqa_operators.media import readable_roots
        from vqa_operators.parsing import describe_validation_error
        from vqa_operators.preview import write_preview
        from vqa_operators.sharding import NearDuplicateSettings, merge_run, write_manifest

        try:
            dedup = None if self.near_duplicates is None else NearDuplicateSettings.model_validate(self.near_duplicates)
        except ValidationError as err:
            raise AirflowFailException(f"invalid near-duplicate parameters: {describe_validation_error(err)}") from None
        try:
            export = None if self.export is None else ExportSettings.model_validate(self.export)
        except ValidationError as err:
            raise AirflowFailException(f"invalid export parameters: {describe_validation_error(err)}") from None
        storage = s3_storage(self.aws_conn_id)
        stages = {name: list(manifests) for name, manifests in self.stages.items()}
        manifest = merge_run(storage, stages, output=self.output_uri, plan=list(self.plan), near_duplicates=dedup)
        self.log.info(
            "merged %d shard(s): %d rows in, %d out, %d failed %s, %d rejected, %d reused from earlier tries -> %s",
            manifest["shards"], manifest["rows_in"], manifest["rows_out"], manifest["rows_failed"], manifest["failures_by_reason"],
            manifest["rows_rejected"], manifest["rows_reused"], manifest["output"],
        )
        if manifest["acceptance_rate"] is not None:
            self.log.info(
                "quality: kept %d of %d pairs (acceptance rate %.1f%%), rejected %s -> %s",
                manifest["pairs_kept"], manifest["pairs_kept"] + manifest["pairs_rejected"], 100 * manifest["acceptance_rate"],
                manifest["rejections_by_reason"], manifest["rejected"],
            )
        title = f"{context['dag'].dag_id} · {context['run_id']}"
        # the media roots, and the run's folder, where the video ingest stored its frames
        allowed = readable_roots(self.media_root, settings.environment().allowed_media_roots, posixpath.dirname(manifest["output"]))
        preview = write_preview(storage, manifest, title=title, media_root=self.media_root, allowed_roots=allowed)
        self.preview_url = storage.url(preview)
        self.log.info("QA preview: %s", preview)
        self.log.info("QA preview in a browser (link valid 7 days; also the task's 'QA preview' button): %s", self.preview_url)
        if export is not None:
            manifest["exports"] = export_run(
                storage, manifest, formats=list(export.formats), embed_images=export.embed_images, media_root=self.media_root,
                allowed_roots=allowed, dataset=context["dag"].dag_id, run_id=context["run_id"],
            )
            write_manifest(storage, manifest)  # again: the manifest names the exports too
            for name, uri in manifest["exports"].items():
                self.log.info("exported %s: %s", name, uri)
        self.announce(context, manifest)
        return manifest

    def announce(self, context: Any, manifest: dict[str, Any]) -> None:
        """Put the run's counts and URIs on each outlet asset's event; Airflow records the events when the task succeeds."""
        from vqa_operators.assets import event_extra

        extra = event_extra(manifest)
        # a run with a logical date (scheduled, backfilled) is that date's partition of the dataset
        partition = context.get("ds") if settings.environment().asset_partitions and context.get("logical_date") else None
        for asset in self.outlets:
            event = context["outlet_events"][asset]
            event.extra.update(extra)
            if partition:
                event.add_partitions(partition)
            self.log.info("announcing %s%s: %d rows out -> %s", asset.name, f" (partition {partition})" if partition else "", manifest["rows_out"], manifest["output"])
