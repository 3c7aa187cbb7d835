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
from collections import Counter
from dataclasses import dataclass
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


def plan_shards(storage: Storage, input_uri: str, *, rows_per_shard: int, max_shards: int = settings.MAX_SHARDS) -> list[Shard]:
    """Split ``input_uri`` into at most ``max_shards`` shards of ``rows_per_shard`` lines (more if the cap needs it).

    One streaming pass; memory holds one offset per ``rows_per_shard`` lines at most ``4 * max_shards``
    of them (the step doubles when there would be more). There is always at least one shard, so
    an empty input still yields (empty) outputs.
    """
    if rows_per_shard < 1 or not 1 <= max_shards <= settings.MAX_SHARDS_LIMIT:
        raise InputError(f"rows_per_shard must be >= 1 and max_shards 1..{settings.MAX_SHARDS_LIMIT}, got {rows_per_shard} and {max_shards}")
    before = storage.version(input_uri)
    if before is None:
        raise InputError(f"cannot read {input_uri}: it does not exist")
    step, marks, lines, offset = rows_per_shard, [0], 0, 0
    for line in storage.iter_lines(input_uri, version=before.token, keepends=True):
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
            shards=len(bounds) - 1,
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


@dataclass
class _DedupCounts:
    rows_rejected: int = 0
    pairs_kept: int = 0
    pairs_rejected: int = 0


def _deduplicate(storage: Storage, out: Any, rejected: Any, sources: list[tuple[str, int]], generator: str, dedup: NearDuplicateSettings) -> tuple[_DedupCounts, dict[str, Any]]:
    """Stream the last stage's rows into ``out`` in order, without the pairs whose question repeats an earlier one's.

    The dropped pairs go to ``rejected`` as ``near_duplicate`` (a row with none left goes there as a row).
    """
    from vqa_operators.dedup import NearDuplicates
    from vqa_operators.generators import row_output_fields
    from vqa_operators.generators.base import PROVENANCE_KEY, input_line
    from vqa_operators.storage.jsonl import JsonlWriter, read_jsonl
    from vqa_operators.worker.run_loop import rejected_entry

    counts = _DedupCounts()
    out_writer, rejected_writer = JsonlWriter(out), JsonlWriter(rejected)
    with NearDuplicates(dedup.threshold) as index:
        for uri, expected in sources:
            count = 0
            for _, row in read_jsonl(storage.iter_lines(uri)):
                count += 1
                if not isinstance(row, dict):
                    raise InputError(f"{uri} line {count} is not a JSON object; rerun that shard")
                fields = row_output_fields(generator, row)
                items = fields.pairs(row)
                line = input_line(row, count)
                texts = [(item.question if dedup.key == "question" else f"{item.question} {item.answer}", [line, item.index]) for item in items]
                matches = index.check_many(texts)
                keep = [item.index for item, match in zip(items, matches, strict=True) if match is None]
                gate = (row.get(PROVENANCE_KEY) or {}).get("quality")
                verdicts = gate.get("verdicts") if isinstance(gate, dict) else None
                for position, (item, match) in enumerate(zip(items, matches, strict=True)):
                    if match is None:
                        continue
                    first_line, first_index = match.first
                    entry = {
                        "index": item.index, "pair": item.raw, "reason": Rejection.NEAR_DUPLICATE,
                        "detail": f"repeats the pair {first_index} of line {first_line} (similarity {match.similarity} >= {dedup.threshold})",
                        "verdicts": verdicts[position] if isinstance(verdicts, list) and position < len(verdicts) else None,
                        "duplicate_of": {"line": first_line, "index": first_index},
                    }
                    rejected_writer.write(rejected_entry("merge", line, entry, row=row, row_rejected=not keep))
                    counts.pairs_rejected += 1
                if len(keep) == len(items):
                    out_writer.write(row)
                elif keep:
                    kept_row = fields.keep(row, keep)
                    if isinstance(gate, dict) and isinstance(verdicts, list) and len(verdicts) == len(items):
                        gate["verdicts"] = [v for v, match in zip(verdicts, matches, strict=True) if match is None]
                    out_writer.write(kept_row)
                else:
                    counts.rows_rejected += 1
                counts.pairs_kept += len(keep)
            if count != expected:
                raise InputError(f"{uri} holds {count} rows but its task reported {expected}; rerun that shard")
        summary = {**dedup.model_dump(), "bands": index.bands, "rows_per_band": index.rows, "pairs_checked": index.kept + index.duplicates, "duplicates": index.duplicates}
    return counts, summary


def _stage_summary(manifests: list[dict[str, Any]], *, output: str | None, errors: str, rejected: str | None) -> dict[str, Any]:
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
    storage: Storage, stages: dict[str, list[dict[str, Any]]], *, output: str, plan: list[dict[str, Any]], near_duplicates: NearDuplicateSettings | None = None
) -> dict[str, Any]:
    """Merge every stage of a sharded run, in shard order: the last stage's rows into ``output``, each stage's errors beside it.

    Each stage's errors go to ``<stage>.errors.jsonl`` in the output's folder, the pairs quality
    decisions dropped to ``<output name>.rejected.jsonl``, and the combined manifest to
    ``<output name>.manifest.json``. With ``near_duplicates`` on, a pair whose question nearly
    repeats an earlier one (in shard order) is dropped here as ``near_duplicate``.
    All or nothing: if the shards' reports do not account for every input row, or a shard's file
    holds another number of rows than its task reported, InputError and no file is written.
    """
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
    errors = {name: f"{folder}/{name}.errors.jsonl" for name in names}
    rejected_uri = rejected_uri_for(output)
    gates = [name for name in names if any(m.get("rejected") for m in ordered[name])]
    dedup = near_duplicates if near_duplicates is not None and near_duplicates.enabled else None
    counts, dedup_summary = _DedupCounts(), None
    with contextlib.ExitStack() as stack:
        for name in names:
            _concatenate(storage, stack.enter_context(storage.open_atomic(errors[name])), [(m["errors"], m["rows_failed"]) for m in ordered[name]])
        output_file = stack.enter_context(storage.open_atomic(output))
        rejected_file = stack.enter_context(storage.open_atomic(rejected_uri)) if gates or dedup else None
        for name in gates:
            _concatenate(storage, rejected_file, [(m["rejected"], m["pairs_rejected"]) for m in ordered[name] if m.get("rejected")])
        sources = [(m["output"], m["rows_out"]) for m in last]
        if dedup is not None:
            counts, dedup_summary = _deduplicate(storage, output_file, rejected_file, sources, last[0]["generator"], dedup)
        else:
            _concatenate(storage, output_file, sources)
    merged = {name: _stage_summary(ordered[name], output=output if name == names[-1] else None, errors=errors[name], rejected=rejected_uri if name in gates else None) for name in names}
    final = merged[names[-1]]
    reasons: Counter[str] = Counter()
    rejections: Counter[str] = Counter()
    for stage in merged.values():
        reasons.update(stage["failures_by_reason"])
        rejections.update(stage["rejections_by_reason"])
    rejections.update({Rejection.NEAR_DUPLICATE.value: counts.pairs_rejected} if counts.pairs_rejected else {})
    pairs_kept = counts.pairs_kept if dedup is not None else final["pairs_kept"]
    pairs_rejected = sum(rejections.values())
    judged = pairs_kept + pairs_rejected if gates or dedup else 0
    manifest = {
        **{k: final[k] for k in ("generator", "shards", "model", "prompt_sha256", "seed")},
        "output": output,
        "errors": errors[names[-1]],
        "rejected": rejected_uri if gates or dedup else None,
        "input": ordered[names[0]][0]["input"],
        "rows_in": rows,
        "rows_out": out - counts.rows_rejected,
        "rows_failed": failed,
        "rows_rejected": rejected_rows + counts.rows_rejected,
        "failures_by_reason": dict(sorted(reasons.items())),
        "pairs_kept": pairs_kept,
        "pairs_rejected": pairs_rejected,
        "rejections_by_reason": dict(sorted(rejections.items())),
        # kept pairs over judged pairs (None: no quality decision in this run)
        "acceptance_rate": round(pairs_kept / judged, 4) if judged else None,
        "near_duplicates": dedup_summary,
        **{key: sum(m[key] for m in merged.values()) for key in ("rows_reused", "requests", "prompt_tokens", "completion_tokens")},
        "stages": merged,
        "manifest": beside(output, ".manifest.json"),
        "preview": beside(output, ".preview.html"),
    }
    write_manifest(storage, manifest)
    return manifest


def write_manifest(storage: Storage, manifest: dict[str, Any]) -> None:
    """Write the merged ``manifest`` (atomically) where it names itself, ``manifest["manifest"]``."""
    with storage.open_atomic(manifest["manifest"]) as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8") + b"\n")
