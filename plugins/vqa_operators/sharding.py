"""Sharded fan-out: split an input JSONL into shards of whole lines (``records.Shard``).

A shard is a byte range of the input, not a copy: ``plan_shards`` reads the input once, and each
mapped worker reads only its range (an S3 ranged GET, pinned to the version that was split with
``If-Match``). Line numbers stay those of the whole input, so errors, checkpoints and provenance
name the same line whichever shard read it. Joining the shards again is ``merge``'s.
"""

from __future__ import annotations

import math

from vqa_operators import settings
from vqa_operators.exceptions import InputError
from vqa_operators.records import Shard
from vqa_operators.storage.uris import Storage


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
        raise InputError(
            f"rows_per_shard must be >= 1 and max_shards 1..{settings.MAX_SHARDS_LIMIT}, got {rows_per_shard} and {max_shards}"
        )
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
            input=input_uri,
            index=i,
            first_line=1 + i * size,
            rows=min(size, lines - i * size),
            start=bounds[i],
            end=bounds[i + 1],
            version=before.token,
            shards=len(bounds) - 1,
            sample_of=total if sample is not None else None,
        )
        for i in range(len(bounds) - 1)
    ]
