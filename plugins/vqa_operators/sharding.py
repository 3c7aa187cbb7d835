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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vqa_operators import settings
from vqa_operators.exceptions import InputError
from vqa_operators.storage.uris import Storage, beside, errors_uri_for


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
        Shard(input=input_uri, index=i, first_line=1 + i * size, rows=min(size, lines - i * size), start=bounds[i], end=bounds[i + 1], version=before.token)
        for i in range(len(bounds) - 1)
    ]


def _concatenate(storage: Storage, jobs: dict[str, list[tuple[str, int]]]) -> None:
    """Write each target of ``jobs`` as its JSONL sources concatenated in order; each source must hold the rows its task reported.

    Every target is published only if every count matches: otherwise InputError, and nothing is written.
    """
    with contextlib.ExitStack() as stack:
        for target, sources in jobs.items():
            out = stack.enter_context(storage.open_atomic(target))
            for uri, expected in sources:
                count = 0
                for line in storage.iter_lines(uri, keepends=True):
                    out.write(line if line.endswith(b"\n") else line + b"\n")
                    count += 1
                if count != expected:
                    raise InputError(f"{uri} holds {count} rows but its task reported {expected}; rerun that shard")


def _stage_summary(manifests: list[dict[str, Any]], *, output: str | None, errors: str) -> dict[str, Any]:
    """One stage's counts over its shards, and where its merged files are."""
    reasons: Counter[str] = Counter()
    for manifest in manifests:
        reasons.update(manifest["failures_by_reason"])
    first = manifests[0]
    summed = ("rows_in", "rows_out", "rows_failed", "rows_reused", "requests", "repairs", "prompt_tokens", "completion_tokens")
    return {
        "generator": first["generator"],
        "output": output,
        "errors": errors,
        "shards": len(manifests),
        **{key: sum(m[key] for m in manifests) for key in summed},
        "failures_by_reason": dict(sorted(reasons.items())),
        "model": first["model"],
        "prompt_sha256": first["prompt_sha256"],
        "seed": first["seed"],
        "slowest_shard_s": max(m["duration_s"] for m in manifests),
    }


def merge_run(storage: Storage, stages: dict[str, list[dict[str, Any]]], *, output: str, plan: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge every stage of a sharded run, in shard order: the last stage's rows into ``output``, each stage's errors beside it.

    Each stage's errors go to ``<stage>.errors.jsonl`` in the output's folder (the last stage's to
    ``<output name>.errors.jsonl``), and the combined manifest to ``<output name>.manifest.json``.
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
    out = sum(m["rows_out"] for m in ordered[names[-1]])
    failed = sum(m["rows_failed"] for manifests in ordered.values() for m in manifests)
    if out + failed != rows:
        raise InputError(f"{rows} input rows but the shards report {out} in the output and {failed} in errors files")
    targets = {name: (output if name == names[-1] else None, errors_uri_for(output) if name == names[-1] else f"{folder}/{name}.errors.jsonl") for name in names}
    jobs: dict[str, list[tuple[str, int]]] = {}
    for name, (stage_output, stage_errors) in targets.items():
        jobs[stage_errors] = [(m["errors"], m["rows_failed"]) for m in ordered[name]]
        if stage_output is not None:
            jobs[stage_output] = [(m["output"], m["rows_out"]) for m in ordered[name]]
    _concatenate(storage, jobs)
    merged = {name: _stage_summary(ordered[name], output=targets[name][0], errors=targets[name][1]) for name in names}
    final = merged[names[-1]]
    reasons: Counter[str] = Counter()
    for stage in merged.values():
        reasons.update(stage["failures_by_reason"])
    manifest = {
        **{k: final[k] for k in ("generator", "output", "errors", "shards", "rows_out", "model", "prompt_sha256", "seed")},
        "input": ordered[names[0]][0]["input"],
        "rows_in": rows,
        "rows_failed": failed,
        "failures_by_reason": dict(sorted(reasons.items())),
        **{key: sum(m[key] for m in merged.values()) for key in ("rows_reused", "requests", "prompt_tokens", "completion_tokens")},
        "stages": merged,
        "manifest": beside(output, ".manifest.json"),
        "preview": beside(output, ".preview.html"),
    }
    with storage.open_atomic(manifest["manifest"]) as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8") + b"\n")
    return manifest
