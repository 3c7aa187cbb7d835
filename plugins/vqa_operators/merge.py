"""The end of a sharded run: near-duplicates across the shards, the stages joined in shard order, and the dataset's files.

- ``deduplicate_shards``: drop, across all the shards and before any pair is judged, the pairs
  whose text nearly repeats an earlier one's (``dedup.NearDuplicates``);
- ``merge_run``: concatenate each stage's shards, in order, into the run's files (the output,
  each stage's errors file, the rejected pairs), check that every input row is accounted for, and
  describe the dataset (``records.RunManifest``);
- ``finalize_run``: the preview, the exports, and the manifest last, so that a manifest in the
  run's folder always names files that exist.

Plain Python: it knows nothing of Airflow (the operators in ``operators/fanout.py`` adapt it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from vqa_operators.exceptions import InputError, Rejection
from vqa_operators.records import (
    Cost,
    DuplicateOf,
    Estimate,
    NearDuplicateIndex,
    NearDuplicateSettings,
    NearDuplicateSummary,
    PairRejection,
    Projected,
    QualityScores,
    RejectedEntry,
    RunManifest,
    Shard,
    StageManifest,
    StageSummary,
)
from vqa_operators.storage.uris import Storage, beside, rejected_uri_for

# the task that drops near-duplicates between the last generation stage and the quality stage
DEDUP_STAGE = "dedup"
_END = object()


def stage_manifests(stage: str, manifests: list[StageManifest | dict[str, Any]]) -> list[StageManifest]:
    """A stage's shard results (XCom's dicts, or the models) as manifests, in shard order; InputError naming what is wrong in one that is not.

    ``stage``: how the error names the stage (``stage generate``).
    """
    from pydantic import ValidationError

    from vqa_operators.parsing import describe_validation_error

    found = []
    for n, manifest in enumerate(manifests):
        try:
            found.append(StageManifest.model_validate(manifest))
        except ValidationError as err:
            raise InputError(f"shard result {n} of {stage} is not a stage manifest: {describe_validation_error(err)}") from None
    return sorted(found, key=lambda m: m.shard or 0)


def _next_verdict(verdicts: Iterator[Any]) -> Any:
    """The index's next verdict; InputError if it has none (the shards changed between dedup's two reads)."""
    verdict = next(verdicts, _END)
    if verdict is _END:
        raise InputError("the shards held more pairs on dedup's second read than on its first; rerun dedup")
    return verdict


def deduplicate_shards(
    storage: Storage,
    manifests: list[StageManifest | dict[str, Any]],
    plan: list[Shard | dict[str, Any]],
    *,
    staging: str,
    dedup: NearDuplicateSettings,
) -> list[StageManifest]:
    """Drop, across all the shards of a run and before any is judged, the pairs whose text nearly repeats an earlier one's.

    ``manifests``: the last generation stage's, one per shard of ``plan``. The shards are read in
    order through one index, so the first occurrence in the run is kept. Each shard's rows, less
    the dropped pairs, go to ``<staging>/dedup/shard-<index>.jsonl`` (where the quality stage's
    task of that shard reads them), and the dropped pairs to ``shard-<index>.rejected.jsonl`` as
    ``near_duplicate`` with the pair they repeat (a row with none left goes there as a row). One
    manifest per shard, in the shape of a worker stage's, so that the merge accounts for every row.
    With ``dedup`` off, the rows pass through unchanged.
    """
    from vqa_operators.dedup import NearDuplicates
    from vqa_operators.generators import row_output_fields
    from vqa_operators.generators.base import input_line
    from vqa_operators.storage.jsonl import JsonlWriter, read_jsonl

    ordered = stage_manifests("the stage dedup reads", manifests)
    if len(ordered) != len(plan):
        raise InputError(f"{len(ordered)} shard results for {len(plan)} shards")
    if any(m.generator is None for m in ordered):
        raise InputError("dedup reads a generator's stage, not another dedup's")

    def shard_rows(manifest: StageManifest) -> Iterator[tuple[int, dict[str, Any], Any, list[Any]]]:
        """Each row of a shard with its count, output fields and pairs; the count must be what its task reported."""
        count = 0
        for _, row in read_jsonl(storage.iter_lines(manifest.output)):
            count += 1
            if not isinstance(row, dict):
                raise InputError(f"{manifest.output} line {count} is not a JSON object; rerun that shard")
            fields = row_output_fields(str(manifest.generator), row)
            yield count, row, fields, fields.pairs(row)
        if count != manifest.rows_out:
            raise InputError(f"{manifest.output} holds {count} rows but its task reported {manifest.rows_out}; rerun that shard")

    def texts() -> Iterator[tuple[str, list[int]]]:
        for manifest in ordered:
            for count, row, _, items in shard_rows(manifest):
                line = input_line(row, count)
                yield from (
                    (
                        item.question if dedup.near_duplicate_key == "question" else f"{item.question} {item.answer}",
                        [line, item.index],
                    )
                    for item in items
                )

    results = []
    with contextlib.ExitStack() as stack:
        # two passes over the shards: every pair's text into the index, then each row with its pairs' verdicts, in the same order
        index = stack.enter_context(NearDuplicates(dedup.near_duplicate_threshold)) if dedup.remove_near_duplicates else None
        if index is not None:
            index.add_many(texts())
        verdicts = index.matches() if index is not None else None
        ran = NearDuplicateIndex(
            **dict(dedup), **({"bands": index.bands, "rows_per_band": index.rows} if index is not None else {})
        )
        for manifest in ordered:
            started = time.monotonic()
            shard = manifest.shard or 0
            output = f"{staging.rstrip('/')}/{DEDUP_STAGE}/shard-{shard:05d}.jsonl"
            rejected_uri = rejected_uri_for(output)
            counts: Counter[str] = Counter()
            with storage.open_atomic(output) as out_file, storage.open_atomic(rejected_uri) as rejected_file:
                out, rejected = JsonlWriter(out_file), JsonlWriter(rejected_file)
                for count, row, fields, items in shard_rows(manifest):
                    counts["rows_in"] = count
                    if verdicts is None:
                        out.write(row)
                        counts["rows_out"] += 1
                        counts["pairs_kept"] += len(items)
                        continue
                    line = input_line(row, count)
                    matches = [_next_verdict(verdicts) for _ in items]
                    keep = [item.index for item, match in zip(items, matches, strict=True) if match is None]
                    for item, match in zip(items, matches, strict=True):
                        if match is None:
                            continue
                        first_line, first_index = match.first
                        rejection = PairRejection(
                            index=item.index,
                            pair=item.raw,
                            reason=Rejection.NEAR_DUPLICATE,
                            verdicts=None,
                            detail=f"repeats the pair {first_index} of line {first_line} (similarity {match.similarity} >= {dedup.near_duplicate_threshold})",
                            duplicate_of=DuplicateOf(line=first_line, index=first_index),
                        )
                        rejected.write(RejectedEntry.of(DEDUP_STAGE, line, rejection, row=row, row_rejected=not keep).dump())
                        counts["pairs_rejected"] += 1
                    counts["pairs_kept"] += len(keep)
                    if keep or not items:
                        # a row with no pair to compare passes on whole: the quality stage says why it has none
                        out.write(row if len(keep) == len(items) else fields.keep(row, keep))
                        counts["rows_out"] += 1
                    else:
                        counts["rows_rejected"] += 1
            results.append(
                StageManifest(
                    kind="dedup",
                    generator=None,
                    source=manifest.generator,
                    shard=manifest.shard,
                    input=manifest.output,
                    output=output,
                    errors=None,
                    rejected=rejected_uri,
                    rows_in=counts["rows_in"],
                    rows_out=counts["rows_out"],
                    rows_failed=0,
                    rows_rejected=counts["rows_rejected"],
                    pairs_kept=counts["pairs_kept"],
                    pairs_rejected=counts["pairs_rejected"],
                    rejections_by_reason={Rejection.NEAR_DUPLICATE.value: counts["pairs_rejected"]}
                    if counts["pairs_rejected"]
                    else {},
                    near_duplicates=ran,
                    duration_s=round(time.monotonic() - started, 3),
                )
            )
        if verdicts is not None and next(verdicts, _END) is not _END:
            raise InputError("the shards held fewer pairs on dedup's second read than on its first; rerun dedup")
    return results


def _concatenate(storage: Storage, out: Any, sources: list[tuple[str, int]]) -> None:
    """Append each JSONL source to ``out`` in order; each must hold the rows its task reported, else InputError."""
    for uri, expected in sources:
        count = 0
        for line in storage.iter_lines(uri, keepends=True):
            out.write(line if line.endswith(b"\n") else line + b"\n")
            count += 1
        if count != expected:
            raise InputError(f"{uri} holds {count} rows but its task reported {expected}; rerun that shard")


def _stage_summary(
    manifests: list[StageManifest], *, output: str | None, errors: str | None, rejected: str | None
) -> StageSummary:
    """One stage's counts over its shards, and where its merged files are."""
    reasons: Counter[str] = Counter()
    rejections: Counter[str] = Counter()
    for manifest in manifests:
        reasons.update(manifest.failures_by_reason)
        rejections.update(manifest.rejections_by_reason)
    first = manifests[0]
    summed = (
        "rows_in",
        "rows_out",
        "rows_failed",
        "rows_reused",
        "rows_rejected",
        "pairs_kept",
        "pairs_rejected",
        "requests",
        "repairs",
        "prompt_tokens",
        "completion_tokens",
    )
    return StageSummary(
        kind=first.kind,
        generator=first.generator,
        output=output,
        errors=errors,
        rejected=rejected,
        shards=len(manifests),
        **{key: sum(getattr(m, key) for m in manifests) for key in summed},
        failures_by_reason=dict(sorted(reasons.items())),
        rejections_by_reason=dict(sorted(rejections.items())),
        model=first.model,
        prompt_sha256=first.prompt_sha256,
        seed=first.seed,
        slowest_shard_s=max(m.duration_s for m in manifests),
    )


def dataset_generator(stages: dict[str, StageSummary]) -> str:
    """The generator whose rows the dataset holds: the last stage's that makes a dataset (a quality gate and dedup keep its rows)."""
    from vqa_operators.generators import GENERATORS, generator_class

    ran = [s.generator for s in stages.values() if s.kind == "generator" and s.generator is not None]
    made = [name for name in ran if name in GENERATORS and generator_class(name).makes_dataset]
    return (made or ran)[-1]


def merge_run(
    storage: Storage,
    stages: dict[str, list[StageManifest | dict[str, Any]]],
    *,
    output: str,
    plan: list[Shard | dict[str, Any]],
    requests_per_s: float | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
) -> RunManifest:
    """Merge every stage of a sharded run, in shard order: the last stage's rows into ``output``, each stage's errors beside it.

    Each stage's errors go to ``<stage>.errors.jsonl`` in the output's folder, and the pairs
    quality decisions dropped (the ``dedup`` stage's near-duplicates among them) to
    ``<output name>.rejected.jsonl``. Returns the run's manifest (``finalize_run`` writes it, to
    ``<output name>.manifest.json``, once the files it names exist). A plan of a sample (an
    estimate's run) adds ``estimate``: what the whole input would cost (``requests_per_s``: the
    server's throughput to project hours with, else the one the sample measured).
    All or nothing: if the shards' reports do not account for every input row, or a shard's file
    holds another number of rows than its task reported, InputError and no file is written.
    """
    shards = [Shard.model_validate(s) for s in plan]
    folder = output.rsplit("/", 1)[0]
    names = list(stages)
    ordered = {name: stage_manifests(f"stage {name}", stages[name]) for name in names}
    for name, manifests in ordered.items():
        if len(manifests) != len(shards):
            raise InputError(f"stage {name} has {len(manifests)} shard results for {len(shards)} shards")
    rows = sum(s.rows for s in shards)
    last = ordered[names[-1]]
    out = sum(m.rows_out for m in last)
    failed = sum(m.rows_failed for manifests in ordered.values() for m in manifests)
    rejected_rows = sum(m.rows_rejected for manifests in ordered.values() for m in manifests)
    if out + failed + rejected_rows != rows:
        raise InputError(
            f"{rows} input rows but the shards report {out} in the output, {failed} in errors files and {rejected_rows} rejected"
        )
    # a stage whose rows cannot fail (dedup) has no errors file
    errors = {name: f"{folder}/{name}.errors.jsonl" for name in names if any(m.errors for m in ordered[name])}
    rejected_uri = rejected_uri_for(output)
    gates = [name for name in names if any(m.rejected for m in ordered[name])]
    with contextlib.ExitStack() as stack:
        for name, uri in errors.items():
            _concatenate(
                storage,
                stack.enter_context(storage.open_atomic(uri)),
                [(m.errors, m.rows_failed) for m in ordered[name] if m.errors],
            )
        output_file = stack.enter_context(storage.open_atomic(output))
        rejected_file = stack.enter_context(storage.open_atomic(rejected_uri)) if gates else None
        for name in gates:
            _concatenate(storage, rejected_file, [(m.rejected, m.pairs_rejected) for m in ordered[name] if m.rejected])
        _concatenate(storage, output_file, [(m.output, m.rows_out) for m in last])
    merged = {
        name: _stage_summary(
            ordered[name],
            output=output if name == names[-1] else None,
            errors=errors.get(name),
            rejected=rejected_uri if name in gates else None,
        )
        for name in names
    }
    reasons: Counter[str] = Counter()
    rejections: Counter[str] = Counter()
    for stage in merged.values():
        reasons.update(stage.failures_by_reason)
        rejections.update(stage.rejections_by_reason)
    pairs_kept = merged[names[-1]].pairs_kept
    pairs_rejected = sum(rejections.values())
    judged = pairs_kept + pairs_rejected if gates else 0
    # kept pairs over judged pairs (None: no quality decision in this run)
    acceptance = round(pairs_kept / judged, 4) if judged else None
    totals = {key: sum(getattr(m, key) for m in merged.values()) for key in ("rows_reused", "repairs", *Cost.model_fields)}
    cost = Cost.per(totals, pairs_kept)
    return RunManifest(
        dag_id=dag_id,
        run_id=run_id,
        generator=dataset_generator(merged),
        shards=len(shards),
        input=ordered[names[0]][0].input,
        output=output,
        errors=errors,
        rejected=rejected_uri if gates else None,
        rows_in=rows,
        rows_out=out,
        rows_failed=failed,
        rows_rejected=rejected_rows,
        failures_by_reason=dict(sorted(reasons.items())),
        pairs_kept=pairs_kept,
        pairs_rejected=pairs_rejected,
        rejections_by_reason=dict(sorted(rejections.items())),
        acceptance_rate=acceptance,
        near_duplicates=_dedup_summary(merged, ordered),
        quality_scores=QualityScores.total(m.quality_scores for manifests in ordered.values() for m in manifests),
        **totals,
        cost_per_kept_pair=cost,
        stages=merged,
        estimate=estimate(shards, merged, totals, pairs_kept, cost=cost, acceptance=acceptance, requests_per_s=requests_per_s),
        manifest=beside(output, ".manifest.json"),
        preview=beside(output, ".preview.html"),
    )


def estimate(
    plan: list[Shard],
    stages: dict[str, StageSummary],
    totals: dict[str, int],
    pairs_kept: int,
    *,
    cost: Cost | None,
    acceptance: float | None,
    requests_per_s: float | None,
) -> Estimate | None:
    """What the whole input would cost, projected from a sample's run (None for a run of the whole input).

    Per row and per kept pair: model calls, prompt and completion tokens; the projection scales the
    sample's totals by input rows over sample rows (``cost``: the run's cost per kept pair). Hours: the projected calls at ``requests_per_s``,
    else at the sample's own rate (its calls over the stages' seconds, which run one after another:
    a small sample seldom fills the server, so this rate is a floor and the hours a ceiling).
    """
    if not plan or plan[0].sample_of is None:
        return None
    sample, whole = sum(s.rows for s in plan), plan[0].sample_of
    scale = whole / sample if sample else 0.0
    seconds = sum(s.slowest_shard_s for s in stages.values() if s.requests)
    measured = totals["requests"] / seconds if seconds else None
    rate = requests_per_s or measured
    projected = Projected(**{key: round(totals[key] * scale) for key in Cost.model_fields}, pairs_kept=round(pairs_kept * scale))
    return Estimate(
        sample_rows=sample,
        input_rows=whole,
        per_row=Cost.per(totals, sample),
        per_kept_pair=cost,
        acceptance_rate=acceptance,
        projected=projected,
        requests_per_s=round(rate, 3) if rate else None,
        throughput="given" if requests_per_s else "measured on the sample",
        server_hours=round(projected.requests / rate / 3600, 3) if rate else None,
    )


def _dedup_summary(merged: dict[str, StageSummary], ordered: dict[str, list[StageManifest]]) -> NearDuplicateSummary | None:
    """The run's near-duplicate pass: its settings, the pairs it dropped, and the judge's calls that saved.

    The calls saved are the dropped pairs times the quality stage's measured calls per judged pair.
    """
    if DEDUP_STAGE not in merged:
        return None
    stage = merged[DEDUP_STAGE]
    names = list(merged)
    judged = [merged[name] for name in names[names.index(DEDUP_STAGE) + 1 :]]
    calls = sum(s.requests for s in judged)
    pairs = sum(s.pairs_kept + s.pairs_rejected for s in judged)
    per_pair = calls / pairs if pairs else 0.0
    ran = ordered[DEDUP_STAGE][0].near_duplicates or NearDuplicateIndex()
    return NearDuplicateSummary(
        **dict(ran),
        pairs_checked=stage.pairs_kept + stage.pairs_rejected,
        duplicates=stage.pairs_rejected,
        rows_rejected=stage.rows_rejected,
        judge_calls_per_pair=round(per_pair, 3),
        judge_calls_saved=round(stage.pairs_rejected * per_pair),
    )


def finalize_run(
    storage: Storage,
    manifest: RunManifest,
    *,
    title: str,
    media_root: str,
    allowed_roots: list[str],
    export: Any = None,
    dataset: str = "",
) -> RunManifest:
    """The merged run's preview page, its exports (``export``: ``records.ExportSettings``, or None), then its manifest, last.

    The manifest names the exports, and is written only once every file it names is there: a
    consumer that finds it can read them all. Returns the manifest as written.
    """
    from vqa_operators.preview import write_preview

    write_preview(storage, manifest, title=title, media_root=media_root, allowed_roots=allowed_roots)
    if export is not None:
        from vqa_operators.export import export_run

        exports = export_run(
            storage,
            manifest,
            formats=list(export.export_formats),
            copy_media=export.copy_media,
            embed_images=export.embed_images,
            media_root=media_root,
            allowed_roots=allowed_roots,
            dataset=dataset,
            run_id=manifest.run_id or "",
        )
        manifest = manifest.model_copy(update={"exports": exports})
    write_manifest(storage, manifest)
    return manifest


def write_manifest(storage: Storage, manifest: RunManifest) -> None:
    """Write ``manifest`` (atomically) where it names itself, ``manifest.manifest``."""
    with storage.open_atomic(manifest.manifest) as handle:
        handle.write(json.dumps(manifest.dump(), indent=2, sort_keys=True).encode("utf-8") + b"\n")


def report(manifest: RunManifest, log: logging.Logger | Any) -> None:
    """The merge's log lines: the estimate, the counts, near-duplicates, the cost per kept pair and the quality stage's acceptance."""
    if manifest.estimate is not None:
        _report_estimate(manifest.estimate, log)
    log.info(
        "merged %d shard(s): %d rows in, %d out, %d failed %s, %d rejected, %d reused from earlier tries -> %s",
        manifest.shards,
        manifest.rows_in,
        manifest.rows_out,
        manifest.rows_failed,
        manifest.failures_by_reason,
        manifest.rows_rejected,
        manifest.rows_reused,
        manifest.output,
    )
    for stage, uri in manifest.errors.items():
        log.info("errors of %s: %d rows -> %s", stage, manifest.stages[stage].rows_failed, uri)
    if manifest.near_duplicates is not None:
        dedup = manifest.near_duplicates
        log.info(
            "near-duplicates: %d of %d pairs dropped before judging, about %d judge calls saved (%.2f a pair)",
            dedup.duplicates,
            dedup.pairs_checked,
            dedup.judge_calls_saved,
            dedup.judge_calls_per_pair,
        )
    if manifest.cost_per_kept_pair is not None:
        cost = manifest.cost_per_kept_pair
        log.info(
            "cost per kept pair: %.2f model calls, %.0f prompt and %.0f completion tokens (%d pairs kept)",
            cost.requests,
            cost.prompt_tokens,
            cost.completion_tokens,
            manifest.pairs_kept,
        )
    if manifest.acceptance_rate is not None:
        log.info(
            "quality: kept %d of %d pairs (acceptance rate %.1f%%), rejected %s -> %s",
            manifest.pairs_kept,
            manifest.pairs_kept + manifest.pairs_rejected,
            100 * manifest.acceptance_rate,
            manifest.rejections_by_reason,
            manifest.rejected,
        )


def _report_estimate(estimate: Estimate, log: logging.Logger | Any) -> None:
    """The estimate's lines: per row, per kept pair, acceptance, and the projection for the whole input."""
    per_row, per_pair, projected = estimate.per_row, estimate.per_kept_pair, estimate.projected
    log.info(
        "estimate from %d of %d rows: per row %.2f calls, %.0f prompt and %.0f completion tokens; per kept pair %s; acceptance %s",
        estimate.sample_rows,
        estimate.input_rows,
        per_row.requests if per_row else 0,
        per_row.prompt_tokens if per_row else 0,
        per_row.completion_tokens if per_row else 0,
        f"{per_pair.requests:.2f} calls, {per_pair.prompt_tokens:.0f} prompt and {per_pair.completion_tokens:.0f} completion tokens"
        if per_pair
        else "n/a (no pair kept)",
        "n/a" if estimate.acceptance_rate is None else f"{100 * estimate.acceptance_rate:.1f}%",
    )
    hours = (
        "n/a"
        if estimate.server_hours is None
        else f"{estimate.server_hours:.2f} hours of one model server at {estimate.requests_per_s} requests/s ({estimate.throughput})"
    )
    log.info(
        "estimate for the whole input: %d model calls, %d prompt and %d completion tokens, about %d pairs kept; %s",
        projected.requests,
        projected.prompt_tokens,
        projected.completion_tokens,
        projected.pairs_kept,
        hours,
    )
