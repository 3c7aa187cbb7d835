"""Sharded fan-out: 1, 2 and 4 shards, each a worker process against its own simulated server.

Each server has ``slots`` x ``latency`` (16 x 0.5 s = 32 requests/s); each shard holds the same
number of rows, so N shards should finish in the time of one, at N times the throughput. The path
is the one the DAG runs: plan the input, run one worker CLI per shard (``--shard``), merge.

    .venv/bin/python bench/scaling.py [--rows-per-shard 192] [--slots 16] [--latency 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import MODEL, PYTHON, ROOT, Result, print_table, sim_server, write_jsonl, write_photos

from vqa_operators.merge import merge_run
from vqa_operators.sharding import plan_shards
from vqa_operators.storage import Storage


def fan_out(
    folder: Path, names: list[str], shards: int, rows_per_shard: int, slots: int, latency: float
) -> tuple[float, float, dict]:
    """(rows/s over the whole fan-out, rows/s over the servers' generation span, merged manifest)."""
    rows = shards * rows_per_shard
    source = write_jsonl(folder / f"in-{shards}.jsonl", [{"id": i, "image": names[i % len(names)]} for i in range(rows)])
    run_dir = folder / f"run-{shards}"
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(sim_server(slots=slots, latency=latency)) for _ in range(shards)]
        started = time.monotonic()
        plan = plan_shards(Storage(), str(source), rows_per_shard=rows_per_shard, max_shards=shards)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
        procs = [
            subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "vqa_operators",
                    "run",
                    "image_qa",
                    "--input",
                    str(source),
                    "--output",
                    str(run_dir / f"shard-{s.index:05d}.jsonl"),
                    "--base-url",
                    server.base_url,
                    "--model",
                    MODEL,
                    "--media-root",
                    str(folder / "media"),
                    "--max-num-seqs",
                    str(slots),
                    "--shard",
                    s.model_dump_json(),
                    "--task-key",
                    f"bench/generate/{shards}/{s.index}",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for s, server in zip(plan, servers, strict=True)
        ]
        manifests = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"shard failed: {err[-2000:]}")
            manifests.append(json.loads(out.strip().splitlines()[-1]))
        merged = merge_run(
            Storage(), {"generate": manifests}, output=str(run_dir / "generate.jsonl"), plan=[s.model_dump() for s in plan]
        )
        wall = time.monotonic() - started
        stats = [server.stats() for server in servers]
    span = max(s["last"] for s in stats) - min(s["first"] for s in stats)
    return rows / wall, rows / span, merged


def run(rows_per_shard: int = 192, slots: int = 16, latency: float = 0.5) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = write_photos(folder / "media", 8, (320, 240))
        figures = {n: fan_out(folder, names, n, rows_per_shard, slots, latency) for n in (1, 2, 4)}
    base_wall, base_span = figures[1][0], figures[1][1]
    efficiency = min(figures[n][1] / (n * base_span) for n in (2, 4))
    line = "; ".join(f"{n}: {figures[n][1]:.0f} rows/s ({figures[n][1] / base_span:.2f}x)" for n in (1, 2, 4))
    walls = "; ".join(f"{n}: {figures[n][0]:.0f} rows/s ({figures[n][0] / base_wall:.2f}x)" for n in (1, 2, 4))
    assert all(figures[n][2]["rows_out"] == n * rows_per_shard for n in figures)
    return [
        Result(
            "6. sharded fan-out, generation span",
            line,
            "near-linear (>= 0.85 of N x)",
            efficiency >= 0.85,
            f"{rows_per_shard} rows per shard, a {slots}-slot x {latency} s server per shard ({slots / latency:.0f} "
            f"req/s each); plan, worker CLI per shard, merge",
        ),
        Result(
            "6. the same, whole fan-out (plan, process start, merge)",
            walls,
            "reported",
            None,
            f"{os.cpu_count()} cores run every worker and server",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows-per-shard", type=int, default=192)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.5)
    args = parser.parse_args()
    print_table(run(args.rows_per_shard, args.slots, args.latency))
