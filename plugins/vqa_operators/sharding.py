"""Sharded fan-out: split an input JSONL into shards of whole lines, and merge the shards' outputs in order.

A shard is a byte range of the input, not a copy: ``plan_shards`` reads the input once, and each
mapped worker reads only its range (an S3 ranged GET, pinned to the version that was split with
``If-Match``). Line numbers stay those of the whole input, so errors, checkpoints and provenance
name the same line whichever shard read it. ``merge_run`` concatenates the shards' outputs (and
errors files) in shard order into the final files and checks every row is accounted for.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vqa_operators import settings
from vqa_operators.exceptions import InputError, Rejection
from vqa_operators.storage.uris import Storage, beside, rejected_uri_for


class Shard(BaseModel):
    """Lines ``first_line .. first_line + rows - 1`` of ``input``: its bytes ``[start, end)`` at ``version``.

    A later stage of the same shard reads the previous stage's output for it, a different file:
    there the range does not apply, and the shard only names the task's place in the fan-out.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    index: int = Field(ge=0)
    first_line: int = Field(ge=1)
    rows: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    version: str | None = None
    # the shards in the run's plan: they run at once, so by default they split one server's batch budget between them
    shards: int = Field(1, ge=1)
    # an estimate's plan covers a sample, the input's first lines: how many lines the whole input has
    sample_of: int | None = Field(None, ge=0)


def plan_shards(
    storage: Storage, input_uri: str, *, rows_per_shard: int, max_shards: int = settings.MAX_SHARDS, sample: int | None = None
) -> list[Shard]:
    """Split ``input_uri`` into at most ``max_shards`` shards of ``rows_per_shard`` lines (more if the cap needs it).

    One streaming pass; memory holds one offset per ``rows_per_shard`` lines at most ``4 * max_shards``
    of them (the step doubles when there would be more). There is always at least one shard, so
    an empty input still yields (empty) outputs. ``sample``: plan only the first ``sample`` lines
    (an estimate's run); every shard then says how many lines the whole input has (``sample_of``).
    """
    if rows_per_shard < 1 or not 1 <= max_shards <= settings.MAX_SHARDS_LIMIT:
        raise InputError(f"rows_per_shard must be >= 1 and max_shards 1..{settings.MAX_SHARDS_LIMIT}, got {rows_per_shard} and {max_shards}")
    before = storage.version(input_uri)
    if before is None:
        raise InputError(f"cannot read {input_uri}: it does not exist")
    step, marks, lines, offset = rows_per_shard, [0], 0, 0
    total = 0
    for line in storage.iter_lines(input_uri, version=before.token, keepends=True):
        total += 1
        if sample is not None and total > sample:
            continue  # counted, not planned
        lines += 1
        offset += len(line)
        if lines % step == 0:
            marks.append(offset)
            if len(marks) > 4 * max_shards:
                marks, step = marks[::2], step * 2
    group = max(1, math.ceil(math.ceil(lines / step) / max_shards))
    bounds = marks[::group]
    if bounds[-1] != offset or len(bounds) == 1:
        bounds.append(offset)
    size = step * group
    return [
        Shard(
            input=input_uri, index=i, first_line=1 + i * size, rows=min(size, lines - i * size), start=bounds[i], end=bounds[i + 1], version=before.token,
            shards=len(bounds) - 1, sample_of=total if sample is not None else None,
        )
        for i in range(len(bounds) - 1)
    ]


class NearDuplicateSettings(BaseModel):
    """The merge's dataset-wide near-duplicate check: on or off, the Jaccard threshold, and what text is compared."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    threshold: float = Field(settings.NEAR_DUPLICATE_THRESHOLD, gt=0.0, le=1.0)
    # "question": questions are compared; "question_answer": the pair's question and answer together
    key: Literal["question", "question_answer"] = "question"


def _concatenate(storage: Storage, out: Any, sources: list[tuple[str, int]]) -> None:
    """Append each JSONL source to ``out`` in order; each must hold the rows its task reported, else InputError."""
    for uri, expected in sources:
        count = 0
        for line in storage.iter_lines(uri, keepends=True):
            out.write(line if line.endswith(b"\n") else line + b"\n")
            count += 1
        if count != expected:
            raise InputError(f"{uri} holds {count} rows but its task reported {expected}; rerun that shard")


# the task that drops near-duplicates between the last generation stage and the quality stage
DEDUP_STAGE = "dedup"
_END = object()


def _next_verdict(verdicts: Iterator[Any]) -> Any:
    """The index's next verdict; InputError if it has none (the shards changed between dedup's two reads)."""
    verdict = next(verdicts, _END)
    if verdict is _END:
        raise InputError("the shards held more pairs on dedup's second read than on its first; rerun dedup")
    return verdict


def deduplicate_shards(
    storage: Storage, manifests: list[dict[str, Any]], plan: list[dict[str, Any]], *, staging: str, dedup: NearDuplicateSettings
) -> list[dict[str, Any]]:
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
    from vqa_operators.generators.base import input_line, rejected_entry
    from vqa_operators.storage.jsonl import JsonlWriter, read_jsonl

    ordered = sorted(manifests, key=lambda m: m["shard"] or 0)
    if len(ordered) != len(plan):
        raise InputError(f"{len(ordered)} shard results for {len(plan)} shards")

    def shard_rows(manifest: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], Any, list[Any]]]:
        """Each row of a shard with its count, output fields and pairs; the count must be what its task reported."""
        count = 0
        for _, row in read_jsonl(storage.iter_lines(manifest["output"])):
            count += 1
            if not isinstance(row, dict):
                raise InputError(f"{manifest['output']} line {count} is not a JSON object; rerun that shard")
            fields = row_output_fields(manifest["generator"], row)
            yield count, row, fields, fields.pairs(row)
        if count != manifest["rows_out"]:
            raise InputError(f"{manifest['output']} holds {count} rows but its task reported {manifest['rows_out']}; rerun that shard")

    def texts() -> Iterator[tuple[str, list[int]]]:
        for manifest in ordered:
            for count, row, _, items in shard_rows(manifest):
                line = input_line(row, count)
                yield from ((item.question if dedup.key == "question" else f"{item.question} {item.answer}", [line, item.index]) for item in items)

    results = []
    with contextlib.ExitStack() as stack:
        # two passes over the shards: every pair's text into the index, then each row with its pairs' verdicts, in the same order
        index = stack.enter_context(NearDuplicates(dedup.threshold)) if dedup.enabled else None
        if index is not None:
            index.add_many(texts())
        verdicts = index.matches() if index is not None else None
        for manifest in ordered:
            started = time.monotonic()
            shard = manifest["shard"] or 0
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
                        entry = {
                            "index": item.index, "pair": item.raw, "reason": Rejection.NEAR_DUPLICATE,
                            "detail": f"repeats the pair {first_index} of line {first_line} (similarity {match.similarity} >= {dedup.threshold})",
                            "verdicts": None, "duplicate_of": {"line": first_line, "index": first_index},
                        }
                        rejected.write(rejected_entry(DEDUP_STAGE, line, entry, row=row, row_rejected=not keep))
                        counts["pairs_rejected"] += 1
                    counts["pairs_kept"] += len(keep)
                    if keep or not items:
                        # a row with no pair to compare passes on whole: the quality stage says why it has none
                        out.write(row if len(keep) == len(items) else fields.keep(row, keep))
                        counts["rows_out"] += 1
                    else:
                        counts["rows_rejected"] += 1
            results.append({
                "generator": DEDUP_STAGE, "source": manifest["generator"], "shard": manifest["shard"], "input": manifest["output"], "output": output,
                "errors": None, "rejected": rejected_uri, "rows_in": counts["rows_in"], "rows_out": counts["rows_out"], "rows_failed": 0,
                "rows_rejected": counts["rows_rejected"], "rows_reused": 0, "pairs_kept": counts["pairs_kept"], "pairs_rejected": counts["pairs_rejected"],
                "failures_by_reason": {}, "rejections_by_reason": {Rejection.NEAR_DUPLICATE.value: counts["pairs_rejected"]} if counts["pairs_rejected"] else {},
                "near_duplicates": {**dedup.model_dump(), **({"bands": index.bands, "rows_per_band": index.rows} if index is not None else {})},
                "model": None, "prompt_sha256": None, "seed": None, "requests": 0, "repairs": 0, "prompt_tokens": 0, "completion_tokens": 0,
                "duration_s": round(time.monotonic() - started, 3),
            })
        if verdicts is not None and next(verdicts, _END) is not _END:
            raise InputError("the shards held fewer pairs on dedup's second read than on its first; rerun dedup")
    return results


def _stage_summary(manifests: list[dict[str, Any]], *, output: str | None, errors: str | None, rejected: str | None) -> dict[str, Any]:
    """One stage's counts over its shards, and where its merged files are."""
    reasons: Counter[str] = Counter()
    rejections: Counter[str] = Counter()
    for manifest in manifests:
        reasons.update(manifest["failures_by_reason"])
        rejections.update(manifest.get("rejections_by_reason") or {})
    first = manifests[0]
    summed = ("rows_in", "rows_out", "rows_failed", "rows_reused", "requests", "repairs", "prompt_tokens", "completion_tokens")
    judged = ("rows_rejected", "pairs_kept", "pairs_rejected")
    return {
        "generator": first["generator"],
        "output": output,
        "errors": errors,
        "rejected": rejected,
        "shards": len(manifests),
        **{key: sum(m[key] for m in manifests) for key in summed},
        **{key: sum(m.get(key, 0) for m in manifests) for key in judged},
        "failures_by_reason": dict(sorted(reasons.items())),
        "rejections_by_reason": dict(sorted(rejections.items())),
        "model": first["model"],
        "prompt_sha256": first["prompt_sha256"],
        "seed": first["seed"],
        "slowest_shard_s": max(m["duration_s"] for m in manifests),
    }


def merge_run(
    storage: Storage, stages: dict[str, list[dict[str, Any]]], *, output: str, plan: list[dict[str, Any]], requests_per_s: float | None = None
) -> dict[str, Any]:
    """Merge every stage of a sharded run, in shard order: the last stage's rows into ``output``, each stage's errors beside it.

    Each stage's errors go to ``<stage>.errors.jsonl`` in the output's folder, the pairs quality
    decisions dropped (the ``dedup`` stage's near-duplicates among them) to
    ``<output name>.rejected.jsonl``, and the combined manifest to ``<output name>.manifest.json``.
    A plan of a sample (an estimate's run) adds ``estimate``: what the whole input would cost
    (``estimate``; ``requests_per_s``: the server's throughput to project hours with, else the one
    the sample measured).
    All or nothing: if the shards' reports do not account for every input row, or a shard's file
    holds another number of rows than its task reported, InputError and no file is written.
    """
    from vqa_operators.generators.quality import merge_score_counts

    folder = output.rsplit("/", 1)[0]
    names = list(stages)
    ordered = {name: sorted(stages[name], key=lambda m: m["shard"]) for name in names}
    for name, manifests in ordered.items():
        if len(manifests) != len(plan):
            raise InputError(f"stage {name} has {len(manifests)} shard results for {len(plan)} shards")
    rows = sum(s["rows"] for s in plan)
    last = ordered[names[-1]]
    out = sum(m["rows_out"] for m in last)
    failed = sum(m["rows_failed"] for manifests in ordered.values() for m in manifests)
    rejected_rows = sum(m.get("rows_rejected", 0) for manifests in ordered.values() for m in manifests)
    if out + failed + rejected_rows != rows:
        raise InputError(f"{rows} input rows but the shards report {out} in the output, {failed} in errors files and {rejected_rows} rejected")
    # a stage whose rows cannot fail (dedup) has no errors file
    errors = {name: f"{folder}/{name}.errors.jsonl" if any(m.get("errors") for m in ordered[name]) else None for name in names}
    rejected_uri = rejected_uri_for(output)
    gates = [name for name in names if any(m.get("rejected") for m in ordered[name])]
    with contextlib.ExitStack() as stack:
        for name, uri in errors.items():
            if uri is not None:
                _concatenate(storage, stack.enter_context(storage.open_atomic(uri)), [(m["errors"], m["rows_failed"]) for m in ordered[name]])
        output_file = stack.enter_context(storage.open_atomic(output))
        rejected_file = stack.enter_context(storage.open_atomic(rejected_uri)) if gates else None
        for name in gates:
            _concatenate(storage, rejected_file, [(m["rejected"], m["pairs_rejected"]) for m in ordered[name] if m.get("rejected")])
        _concatenate(storage, output_file, [(m["output"], m["rows_out"]) for m in last])
    merged = {name: _stage_summary(ordered[name], output=output if name == names[-1] else None, errors=errors[name], rejected=rejected_uri if name in gates else None) for name in names}
    final = merged[names[-1]]
    reasons: Counter[str] = Counter()
    rejections: Counter[str] = Counter()
    for stage in merged.values():
        reasons.update(stage["failures_by_reason"])
        rejections.update(stage["rejections_by_reason"])
    pairs_kept = final["pairs_kept"]
    pairs_rejected = sum(rejections.values())
    judged = pairs_kept + pairs_rejected if gates else 0
    # kept pairs over judged pairs (None: no quality decision in this run)
    acceptance = round(pairs_kept / judged, 4) if judged else None
    totals = {key: sum(m[key] for m in merged.values()) for key in ("rows_reused", "requests", "prompt_tokens", "completion_tokens")}
    # what each pair of the dataset cost, every stage's model calls and tokens included (None: no pair kept)
    cost = cost_per_pair(totals, pairs_kept)
    manifest = {
        **{k: final[k] for k in ("generator", "shards", "model", "prompt_sha256", "seed")},
        "output": output,
        "errors": errors[names[-1]],
        "rejected": rejected_uri if gates else None,
        "input": ordered[names[0]][0]["input"],
        "rows_in": rows,
        "rows_out": out,
        "rows_failed": failed,
        "rows_rejected": rejected_rows,
        "failures_by_reason": dict(sorted(reasons.items())),
        "pairs_kept": pairs_kept,
        "pairs_rejected": pairs_rejected,
        "rejections_by_reason": dict(sorted(rejections.items())),
        "acceptance_rate": acceptance,
        "near_duplicates": _dedup_summary(merged, ordered),
        # the judged pairs' grounding scores, blind agreements and failing checks (None: nothing judged)
        "quality_scores": merge_score_counts([m.get("quality_scores") for manifests in ordered.values() for m in manifests]),
        **totals,
        "cost_per_kept_pair": cost,
        "stages": merged,
        "estimate": estimate(plan, merged, totals, pairs_kept, cost=cost, acceptance=acceptance, requests_per_s=requests_per_s),
        "manifest": beside(output, ".manifest.json"),
        "preview": beside(output, ".preview.html"),
    }
    write_manifest(storage, manifest)
    return manifest


def estimate(
    plan: list[dict[str, Any]], stages: dict[str, dict[str, Any]], totals: dict[str, Any], pairs_kept: int, *, cost: dict[str, float] | None,
    acceptance: float | None, requests_per_s: float | None,
) -> dict[str, Any] | None:
    """What the whole input would cost, projected from a sample's run (None for a run of the whole input).

    Per row and per kept pair: model calls, prompt and completion tokens; the projection scales the
    sample's totals by input rows over sample rows (``cost``: the run's cost per kept pair). Hours: the projected calls at ``requests_per_s``,
    else at the sample's own rate (its calls over the stages' seconds, which run one after another:
    a small sample seldom fills the server, so this rate is a floor and the hours a ceiling).
    """
    if not plan or plan[0].get("sample_of") is None:
        return None
    sample, whole = sum(s["rows"] for s in plan), plan[0]["sample_of"]
    scale = whole / sample if sample else 0.0
    seconds = sum(s["slowest_shard_s"] for s in stages.values() if s["requests"])
    measured = totals["requests"] / seconds if seconds else None
    rate = requests_per_s or measured
    projected = {key: round(totals[key] * scale) for key in ("requests", "prompt_tokens", "completion_tokens")}
    return {
        "sample_rows": sample, "input_rows": whole,
        "per_row": {key: round(totals[key] / sample, 3) for key in projected} if sample else None,
        "per_kept_pair": cost, "acceptance_rate": acceptance,
        "projected": {**projected, "pairs_kept": round(pairs_kept * scale)},
        "requests_per_s": round(rate, 3) if rate else None, "throughput": "given" if requests_per_s else "measured on the sample",
        # hours of one model server (times its GPUs for GPU-hours)
        "server_hours": round(projected["requests"] / rate / 3600, 3) if rate else None,
    }


def cost_per_pair(usage: dict[str, Any], pairs: int) -> dict[str, float] | None:
    """Model calls, prompt and completion tokens per pair (None for no pair)."""
    if not pairs:
        return None
    return {key: round(usage[key] / pairs, 3) for key in ("requests", "prompt_tokens", "completion_tokens")}


def _dedup_summary(merged: dict[str, dict[str, Any]], ordered: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The run's near-duplicate pass: its settings, the pairs it dropped, and the judge's calls that saved.

    The calls saved are the dropped pairs times the quality stage's measured calls per judged pair.
    """
    if DEDUP_STAGE not in merged:
        return None
    stage = merged[DEDUP_STAGE]
    names = list(merged)
    judged = [merged[name] for name in names[names.index(DEDUP_STAGE) + 1 :]]
    calls = sum(s["requests"] for s in judged)
    pairs = sum(s["pairs_kept"] + s["pairs_rejected"] for s in judged)
    per_pair = calls / pairs if pairs else 0.0
    return {
        **ordered[DEDUP_STAGE][0]["near_duplicates"],
        "pairs_checked": stage["pairs_kept"] + stage["pairs_rejected"], "duplicates": stage["pairs_rejected"], "rows_rejected": stage["rows_rejected"],
        "judge_calls_per_pair": round(per_pair, 3), "judge_calls_saved": round(stage["pairs_rejected"] * per_pair),
    }


def write_manifest(storage: Storage, manifest: dict[str, Any]) -> None:
    """Write the merged ``manifest`` (atomically) where it names itself, ``manifest["manifest"]``."""
    with storage.open_atomic(manifest["manifest"]) as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8") + b"\n")
