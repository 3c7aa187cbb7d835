"""Flat memory: peak RSS of the worker CLI on a 20k-row shard against a 1k-row shard, with a fast server.

Each run is a fresh ``python -m vqa_operators run image_qa`` process; its peak RSS comes from GNU
``time -f %M``. (Not from this process's ``wait4``: a forked child's peak counts the parent's pages
at the fork, and the bench process is large.) The server is the simulated one (unlimited slots,
no latency) in its own process.

    .venv/bin/python bench/memory.py [--small 1000] [--large 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from common import MODEL, PYTHON, ROOT, Result, print_table, sim_server, write_jsonl, write_photos


def peak_rss_mb(argv: list[str]) -> float:
    """Run ``argv`` to completion (it must succeed); its peak resident set size in MiB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss_kb=%M", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {proc.stderr[-2000:]}")
    return int(proc.stderr.strip().splitlines()[-1].removeprefix("maxrss_kb=")) / 1024


def run(small: int = 1000, large: int = 20_000) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp, sim_server(slots=None, latency=0.0) as server:
        folder = Path(tmp)
        names = write_photos(folder / "media", 8, (320, 240))
        peaks = {}
        for rows in (small, large):
            source = write_jsonl(
                folder / f"in-{rows}.jsonl", [{"id": i, "image": names[i % len(names)], "note": "x" * 200} for i in range(rows)]
            )
            peaks[rows] = peak_rss_mb(
                [
                    PYTHON,
                    "-m",
                    "vqa_operators",
                    "run",
                    "image_qa",
                    "--input",
                    str(source),
                    "--output",
                    str(folder / f"out-{rows}.jsonl"),
                    "--base-url",
                    server.base_url,
                    "--model",
                    MODEL,
                    "--media-root",
                    str(folder / "media"),
                    "--concurrency",
                    "64",
                ]
            )
    ratio = peaks[large] / peaks[small]
    return [
        Result(
            "3. flat memory",
            f"{peaks[large]:.0f} MB at {large // 1000}k rows / {peaks[small]:.0f} MB at {small // 1000}k = {ratio:.2f}",
            "ratio <= 1.3 and < 400 MB",
            ratio <= 1.3 and peaks[large] < 400,
            "peak RSS of the worker CLI process (GNU time), concurrency 64",
        )
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20_000)
    args = parser.parse_args()
    print_table(run(args.small, args.large))
