"""One server shared by a run's 16 shards: its capacity used, and no request timing out.

A simulated continuous-batching server (32 slots x 0.5 s: capacity 64 requests/s) serves 16
shard tasks of one image_qa run at once, each a worker run of its own shard (threads of this
process, each with its own client and event loop, as pods would be). The request timeout is
5 s, ten answers' time, as 300 s is for answers of 30 s. By default each shard keeps
ceil(1.25 x 32 / 16) = 3 requests in flight; the comparison gives every shard the budget of a
whole server (40), as before the split. The figure is served requests / span / capacity, where
the span is the server's first request to its last answer; timeouts are the requests the
server saw beyond one per row (a timed-out request is sent again).

    .venv/bin/python bench/shared_server.py [--shards 16] [--rows-per-shard 60]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import MODEL, Result, SimServer, print_table, sim_server, write_jsonl

from testkit.data import make_jpeg
from vqa_operators.exceptions import JobError
from vqa_operators.records import Shard
from vqa_operators.settings import default_concurrency
from vqa_operators.sharding import plan_shards
from vqa_operators.storage import Storage
from vqa_operators.worker import JobOptions, run_job

SLOTS, LATENCY, TIMEOUT = 32, 0.5, 5.0


def shard_run(server: SimServer, folder: Path, shard: Shard, concurrency: int | None, tag: str) -> dict | str:
    opts = JobOptions(
        generator="image_qa",
        output=str(folder / tag / f"shard-{shard.index:05d}.jsonl"),
        base_url=server.base_url,
        model=MODEL,
        media_root=str(folder / "media"),
        max_num_seqs=SLOTS,
        concurrency=concurrency,
        seed=1,
        params={"pairs_per_row": 2},
        shard=shard,
        request_timeout=TIMEOUT,
        max_retries=3,
        max_consecutive_failures=50,
    )
    try:
        return run_job(opts)
    except JobError as exc:
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def run_shards(server: SimServer, folder: Path, shards: list[Shard], concurrency: int | None, tag: str) -> dict:
    server.stats(reset=True)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(shards)) as pool:
        results = list(pool.map(lambda s: shard_run(server, folder, s, concurrency, tag), shards))
    wall = time.monotonic() - started
    stats = server.stats()
    rows = sum(s.rows for s in shards)
    done = [r for r in results if isinstance(r, dict)]
    return {
        "ratio": stats["requests"] / stats["span_s"] / (SLOTS / LATENCY) if stats["requests"] else 0.0,
        "timeouts": stats["requests"] - sum(r["rows_in"] for r in done) if len(done) == len(shards) else None,
        "failed_tasks": [r for r in results if isinstance(r, str)],
        "rows": rows,
        "wall": wall,
        "max_queue_s": stats.get("max_queue_s", 0.0),
        "peak": stats["peak_concurrency"],
        "concurrency": sum(
            JobOptions(
                generator="image_qa", input="x", output="y", max_num_seqs=SLOTS, concurrency=concurrency, shard=s
            ).effective_concurrency
            for s in shards
        ),
    }


def run(shards_count: int = 16, rows_per_shard: int = 60) -> list[Result]:
    """The two runs, split and whole, as bench lines."""
    with tempfile.TemporaryDirectory() as tmp, sim_server(slots=SLOTS, latency=LATENCY) as server:
        folder = Path(tmp)
        (folder / "media").mkdir()
        rows = shards_count * rows_per_shard
        for i in range(rows):
            (folder / "media" / f"{i}.jpg").write_bytes(make_jpeg((64 + i % 50, 48), color=(i % 256, 90, 160)))
        source = write_jsonl(folder / "in.jsonl", [{"id": i, "image": f"{i}.jpg"} for i in range(rows)])
        shards = plan_shards(Storage(), str(source), rows_per_shard=rows_per_shard, max_shards=shards_count)
        assert len(shards) == shards_count and all(s.shards == shards_count for s in shards)
        split = run_shards(server, folder, shards, None, "split")
        whole = run_shards(server, folder, shards, default_concurrency(SLOTS), "whole")

    def detail(r: dict) -> str:
        return (
            f"{shards_count} shards x {rows_per_shard} rows, server {SLOTS} slots x {LATENCY} s, timeout {TIMEOUT} s; concurrency {r['concurrency']} in all, "
            f"peak {r['peak']} at the server, longest queue {r['max_queue_s']:.1f} s, {r['wall']:.1f} s wall"
            + (f"; first failure: {r['failed_tasks'][0]}" if r["failed_tasks"] else "")
        )

    return [
        Result(
            f"{shards_count} shards sharing one server (default: budget split)",
            f"{split['ratio']:.2f} of capacity, {split['timeouts']} timeouts",
            ">= 0.9, 0 timeouts",
            split["ratio"] >= 0.9 and split["timeouts"] == 0 and not split["failed_tasks"],
            detail(split),
        ),
        Result(
            f"{shards_count} shards, each with a whole server's budget (before)",
            f"{whole['ratio']:.2f} of capacity, {whole['timeouts'] if whole['timeouts'] is not None else 'many'} "
            f"timeouts, {len(whole['failed_tasks'])} tasks failed",
            "for comparison",
            None,
            detail(whole),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows-per-shard", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print_table(run(args.shards, args.rows_per_shard))


if __name__ == "__main__":
    main()
