"""The fan-out around the worker tasks: ``VQAShardPlanOperator`` splits the input, ``VQAMergeOperator`` joins the shards.

Both are I/O only (no model, no GPU) and stream, so they run in the Airflow worker in either
execution mode. The plan is a list of small dicts (byte ranges) that the worker task is mapped
over; the merge writes the run's final JSONL, errors and combined manifest.
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, BaseOperatorLink

from vqa_operators import settings
from vqa_operators.hooks.storage import s3_storage
from vqa_operators.operators.spec import FromParam, WorkerSpec, resolve

if TYPE_CHECKING:
    from vqa_operators.records import RunManifest


class VQAShardPlanOperator(BaseOperator):
    """Check the run's parameters, split ``input`` into shards of ``rows_per_shard`` lines (at most ``max_shards``); return the plan.

    The params are data (``run_params``): none is rendered as a template; each argument is the run's param as the form
    gave it (``FromParam``, the default of each), or a value. ``input`` (the ``input_uri`` param) may hold the run's date
    placeholders, which are filled in here from the run's logical date alone; anything else template-like in any param fails this task. The input,
    ``output_prefix`` (and the run's folder under it) and ``media_root`` must lie within the
    deployment's allowed roots. The worker specs of the tasks mapped over this plan are validated
    too (rendered with this run's params). All of it happens before a byte is read or written, and
    a bad parameter fails this task at once, without retries, with the param and the rule.
    """

    ui_color = "#fdf6e3"

    def __init__(
        self,
        *,
        input: Any = FromParam("input_uri"),  # noqa: A002 - the worker's option name
        rows_per_shard: Any = FromParam("rows_per_shard"),
        max_shards: Any = FromParam("max_shards"),
        output_prefix: Any = FromParam("output_prefix"),
        media_root: Any = FromParam("media_root"),
        model: Any = FromParam("model"),
        sample: Any = FromParam("estimate_rows"),
        aws_conn_id: str | None = "aws_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sample = sample
        self.input = input
        self.rows_per_shard = rows_per_shard
        self.max_shards = max_shards
        self.output_prefix = output_prefix
        self.media_root = media_root
        self.model = model
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

    def pod_settings(self) -> list[Any]:
        """The pod settings of every task of the DAG that makes pods (its worker tasks, the run's server)."""
        from vqa_operators.operators.placement import PodSettings

        found = []
        for task in self.dag.tasks if self.has_dag() else []:
            partial = getattr(task, "partial_kwargs", None)
            given = partial.get("pod") if isinstance(partial, dict) else None
            for value in (given, getattr(task, "placement", None), getattr(task, "pod", None)):
                if isinstance(value, PodSettings):
                    found.append(value)
        return found

    def check_secrets(self) -> None:
        """kubernetes mode: the Secrets (and keys) the DAG's pods read exist, or a ConfigError names each missing one, before any pod
        is made (a pod that reads a missing Secret never starts). An Airflow whose account may not read Secrets skips this, saying so."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes.client.exceptions import ApiException

        from vqa_operators.exceptions import ConfigError
        from vqa_operators.operators.containers import missing_secrets

        placements = self.pod_settings()
        if not placements:
            return
        hook = KubernetesHook()
        namespace = placements[0].namespace or hook.get_namespace() or "default"
        core = hook.core_v1_client

        def read_secret(name: str) -> set[str] | None:
            try:
                secret = core.read_namespaced_secret(name, namespace)
            except ApiException as err:
                if err.status == 404:
                    return None
                raise
            return set(secret.data or {}) | set(secret.string_data or {})

        try:
            problems = missing_secrets(read_secret, [p for p in placements if (p.namespace or namespace) == namespace])
        except ApiException as err:
            if err.status != 403:
                raise
            self.log.warning(
                "could not check the pods' Secrets in %s (403: this account may not get Secrets; deploy/rbac.yaml grants it)",
                namespace,
            )
            return
        if problems:
            raise ConfigError(
                f"the pods of this DAG read Secrets the namespace {namespace} lacks: {'; '.join(problems)}. Create them (deploy/secrets.yaml), "
                'or change the pod settings (VQA_POD_DEFAULTS, e.g. {"s3_secret": null} for IRSA or workload identity)'
            )
        self.log.info("the Secrets the pods read exist in %s", namespace)

    def check_params(self, context: Any) -> str:
        """The run's input URI, its dates filled in, once every param has passed the rules; ConfigError otherwise."""
        from vqa_operators import run_params as rules
        from vqa_operators.exceptions import ConfigError
        from vqa_operators.worker import validate_spec

        env = settings.environment()
        params = context.get("params") or {}
        rules.refuse_templates(params, dated=("input_uri",))
        locations = {"input_uri": self.input, "output_prefix": self.output_prefix, "media_root": self.media_root}
        given = {param: resolve(value, params) for param, value in locations.items()}
        for param, value in given.items():
            if (
                value is None or value == ""
            ):  # the DAG's default derives from VQA_DATA_ROOT, which is not set; the run did not give one
                raise ConfigError(
                    f"param {param} is not given, and VQA_DATA_ROOT is not set: give {param}, or set VQA_DATA_ROOT to "
                    f"the data's location (s3://bucket[/prefix]) so that the DAGs' defaults derive from it"
                )
        input_uri = rules.fill_run_dates(given["input_uri"], context.get("logical_date"), param="input_uri")
        rules.check_location("input_uri", input_uri, env.allowed_input_roots, setting=rules.INPUT_ROOTS)
        output_prefix = given["output_prefix"]
        rules.check_location("output_prefix", output_prefix, env.allowed_output_roots, setting=rules.OUTPUT_ROOTS)
        # the run writes under <output_prefix>/<dag_id>/<run_id>: a run id of '..' would leave the prefix's folder
        run_folder = f"{output_prefix.rstrip('/')}/{context['dag'].dag_id}/{context['run_id']}"
        rules.check_location(
            "output_prefix (with the DAG id and run id)", run_folder, env.allowed_output_roots, setting=rules.OUTPUT_ROOTS
        )
        rules.check_location("media_root", given["media_root"], env.allowed_media_roots, setting=rules.MEDIA_ROOTS)
        if model := resolve(self.model, params):
            rules.check_model_name("model", model)
        for spec in self.worker_specs():
            # rendered as the worker task will render it, on a copy: the DAG's spec stays as written
            rendered = self.render_template(copy.deepcopy(spec), context)
            validate_spec(rendered.values(context), input_uri)
        return input_uri

    def execute(self, context: Any) -> list[dict[str, Any]]:
        """Validate the parameters, read the input once and return one small dict per shard."""
        from vqa_operators.exceptions import ConfigError
        from vqa_operators.operators.failures import fail_fast
        from vqa_operators.sharding import plan_shards

        with fail_fast():
            try:
                input_uri = self.check_params(context)
            except ConfigError as err:
                raise ConfigError(f"invalid parameters: {err}") from None
            if settings.environment().execution == "kubernetes":
                self.check_secrets()
            # a missing or forbidden input is an InputError: another try would find the same
            params = context.get("params") or {}
            sample = resolve(self.sample, params) or None
            plan = plan_shards(
                s3_storage(self.aws_conn_id),
                input_uri,
                rows_per_shard=resolve(self.rows_per_shard, params),
                max_shards=resolve(self.max_shards, params),
                sample=sample,
            )
        rows = sum(s.rows for s in plan)
        self.log.info("%s: %d rows in %d shard(s) of up to %d rows", input_uri, rows, len(plan), max(s.rows for s in plan))
        if sample is not None:
            self.log.info("an estimate: the first %d of the input's %d rows go through every stage", rows, plan[0].sample_of)
        return [s.dump() for s in plan]


def lifetime(seconds: int) -> str:
    """``1 day``, ``6 hours``, ``90 seconds``: a link's lifetime for a log line."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


class QAPreviewLink(BaseOperatorLink):
    """The merge task's "QA preview" button: the presigned URL of the run's HTML preview."""

    name = "QA preview"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        """Called in the worker once the task ends (Airflow stores the link in XCom); empty if no preview was written."""
        return getattr(operator, "preview_url", None) or ""


class VQADedupOperator(BaseOperator):
    """Drop near-duplicate pairs across all the shards of a run, before the quality stage judges any (I/O only, no model).

    ``upstream``: the manifests of the last generation stage's shards. Each shard's rows, less
    the pairs whose text nearly repeats an earlier one's in the run (the first is kept), are staged
    where the quality task of that shard reads them; the settings come from the run's params
    (``near_duplicates``: ``NearDuplicateSettings`` fields). Returns one manifest per shard.
    """

    template_fields: Sequence[str] = ("upstream", "plan", "staging_root", "near_duplicates")
    ui_color = "#e3f0fd"

    def __init__(
        self,
        *,
        upstream: Any,
        plan: Any,
        staging_root: str,
        near_duplicates: dict[str, Any],
        aws_conn_id: str | None = "aws_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.upstream = upstream
        self.plan = plan
        self.staging_root = staging_root
        self.near_duplicates = near_duplicates
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> list[dict[str, Any]]:
        """Read the shards in order through one index; stage each shard's kept rows and its dropped pairs."""
        from pydantic import ValidationError

        from vqa_operators.exceptions import ConfigError
        from vqa_operators.merge import deduplicate_shards
        from vqa_operators.operators.failures import fail_fast
        from vqa_operators.parsing import describe_validation_error
        from vqa_operators.records import NearDuplicateSettings

        with fail_fast():
            try:
                settings_ = NearDuplicateSettings.model_validate(resolve(self.near_duplicates, context.get("params") or {}))
            except ValidationError as err:
                raise ConfigError(f"invalid near-duplicate parameters: {describe_validation_error(err)}") from None
            manifests = deduplicate_shards(
                s3_storage(self.aws_conn_id), list(self.upstream), list(self.plan), staging=self.staging_root, dedup=settings_
            )
        pairs = sum(m.pairs_kept + m.pairs_rejected for m in manifests)
        dropped = sum(m.pairs_rejected for m in manifests)
        if settings_.remove_near_duplicates:
            self.log.info(
                "near-duplicates (%s, threshold %s): %d of %d pairs dropped across %d shard(s) before judging, %d rows left with none",
                settings_.near_duplicate_key,
                settings_.near_duplicate_threshold,
                dropped,
                pairs,
                len(manifests),
                sum(m.rows_rejected for m in manifests),
            )
        else:
            self.log.info("near-duplicates: off; %d pairs passed through to judging", pairs)
        return [m.dump() for m in manifests]


class VQAMergeOperator(BaseOperator):
    """Concatenate each stage's shard outputs in order into ``output_uri`` (and errors files), write the QA preview; return the combined manifest."""

    template_fields: Sequence[str] = ("stages", "output_uri", "plan")
    ui_color = "#e3fdec"
    operator_extra_links = (QAPreviewLink(),)

    def __init__(
        self,
        *,
        stages: dict[str, Any],
        output_uri: str,
        plan: Any,
        media_root: Any = ".",
        requests_per_s: Any = None,
        export: dict[str, Any] | None = None,
        aws_conn_id: str | None = "aws_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stages = stages
        self.requests_per_s = requests_per_s
        self.export = export
        self.output_uri = output_uri
        self.plan = plan
        self.media_root = media_root
        self.aws_conn_id = aws_conn_id
        self.preview_url: str | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        """Merge and finalize the run (``merge.merge_run``, ``merge.finalize_run``), announce the dataset; return its manifest.

        A shard whose file disagrees with its task, a dataset that cannot be exported ...: another
        try would meet it again, so such job errors fail the task at once.
        """
        from pydantic import ValidationError

        from vqa_operators.exceptions import ConfigError
        from vqa_operators.media import readable_roots
        from vqa_operators.merge import finalize_run, merge_run, report
        from vqa_operators.operators.failures import fail_fast
        from vqa_operators.parsing import describe_validation_error
        from vqa_operators.records import ExportSettings

        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        params = context.get("params") or {}
        with fail_fast():
            try:
                export = None if self.export is None else ExportSettings.model_validate(resolve(self.export, params))
            except ValidationError as err:
                raise ConfigError(f"invalid export parameters: {describe_validation_error(err)}") from None
            storage = s3_storage(self.aws_conn_id)
            media_root, rate = resolve(self.media_root, params), resolve(self.requests_per_s, params)
            stages = {name: list(manifests) for name, manifests in self.stages.items()}
            manifest = merge_run(
                storage, stages, output=self.output_uri, plan=list(self.plan), requests_per_s=rate, dag_id=dag_id, run_id=run_id
            )
            report(manifest, self.log)
            # the media roots, and the run's folder, where the video ingest stored its frames
            allowed = readable_roots(media_root, settings.environment().allowed_media_roots, posixpath.dirname(manifest.output))
            manifest = finalize_run(
                storage,
                manifest,
                title=f"{dag_id} · {run_id}",
                media_root=media_root,
                allowed_roots=allowed,
                export=export,
                dataset=dag_id,
            )
        self.log.info("QA preview: %s", manifest.preview)
        for name, uri in manifest.exports.items():
            self.log.info("exported %s: %s", name, uri)
        self.log.info("manifest: %s", manifest.manifest)
        link_seconds = settings.environment().preview_link_seconds
        if link_seconds:
            # anyone holding the link can open the page until it expires: it is logged, and kept as the task's extra link
            self.preview_url = storage.url(manifest.preview, expires_s=link_seconds)
            self.log.info(
                "QA preview in a browser (link valid %s; also the task's 'QA preview' button): %s",
                lifetime(link_seconds),
                self.preview_url,
            )
        self.announce(context, manifest)
        return manifest.dump()

    def announce(self, context: Any, manifest: RunManifest) -> None:
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
            self.log.info(
                "announcing %s%s: %d rows out -> %s",
                asset.name,
                f" (partition {partition})" if partition else "",
                manifest.rows_out,
                manifest.output,
            )
