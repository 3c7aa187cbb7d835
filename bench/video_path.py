"""Video QA critical path: all three stages on 32 rows with 3 iterations against a simulated server.

One row's chain of dependent calls is initial (1) + multi-agent (3 per iteration: recruit, expert,
revise) + final (1). With enough server slots for every row, a stage can finish no sooner than
its chain x latency; the figure is the generation time (the server's first request to its last
answer, per stage and in all) over that bound. A row-after-row loop would be about 32x.

    .venv/bin/python bench/video_path.py [--rows 32] [--iterations 3] [--latency 1.0 --latency 5.0]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from common import MODEL, Result, print_table, sim_server, write_jsonl, write_photos

from vqa_operators.worker import JobOptions, run_job


def run(rows: int = 32, iterations: int = 3, latencies: tuple[float, ...] = (1.0, 5.0)) -> list[Result]:
    """The critical-path ratio at each latency per call (a real 12-frame video request takes longer than either)."""
    return [result for latency in latencies for result in run_one(rows, iterations, latency)]


def run_one(rows: int, iterations: int, latency: float) -> list[Result]:
    logging.getLogger("vqa_operators").setLevel(logging.WARNING)
    chains = {"video_qa_initial": 1, "video_qa_multiagent": 3 * iterations, "video_qa_final": 1}
    with tempfile.TemporaryDirectory() as tmp, sim_server(slots=rows, latency=latency) as server:
        folder = Path(tmp)
        frames = write_photos(folder / "media", 16, (1280, 720))  # keyframes, above the 448x448 frame budget
        clips = [
            {
                "Description": f"scene {c}",
                "Audio_Text": f"line {c}",
                "Frames_Images": [frames[(c * 4 + f) % len(frames)] for f in range(4)],
            }
            for c in range(3)
        ]
        source = write_jsonl(folder / "in.jsonl", [{"id": i, "Meta": f"advert {i}", "Clips": clips} for i in range(rows)])
        spans, requests, repairs = {}, 0, 0
        for stage in chains:
            output = folder / f"{stage}.jsonl"
            server.stats(reset=True)
            manifest = run_job(
                JobOptions(
                    generator=stage,
                    input=str(source),
                    output=str(output),
                    base_url=server.base_url,
                    model=MODEL,
                    media_root=str(folder / "media"),
                    max_num_seqs=rows,
                    seed=1,
                    max_tokens=4096,
                    params={"max_iterations": iterations} if stage.endswith("multiagent") else {},
                )
            )
            assert manifest.rows_out == rows, manifest
            stats = server.stats()
            spans[stage], requests, repairs = stats["span_s"], requests + stats["requests"], repairs + manifest.repairs
            source = output
        # what preparing one stage's frames costs on this machine, with every core (as the worker does)
        from concurrent.futures import ThreadPoolExecutor

        from vqa_operators.media import prepare_image

        paths = [folder / "media" / f for _ in range(rows) for clip in clips for f in clip["Frames_Images"]]
        started = time.monotonic()
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(lambda p: prepare_image(p.read_bytes(), source=p.name, max_pixels=448 * 448), paths))
        prep_s = time.monotonic() - started
    bound = sum(chains.values()) * latency
    total = sum(spans.values())
    per_stage = "; ".join(f"{s.removeprefix('video_qa_')} {spans[s]:.2f}/{chains[s] * latency:.0f} s" for s in chains)
    return [
        Result(
            f"2. video QA critical path, {latency:.0f} s a call",
            f"{total / bound:.3f} x bound",
            "<= 1.25",
            total / bound <= 1.25,
            f"{rows} rows, {iterations} iterations, {latency:.1f} s per call: {total:.2f} s for a chain of {sum(chains.values())} calls "
            f"({per_stage}); {requests} requests, {repairs} repairs; a row-after-row loop: {rows}x. Preparing one stage's "
            f"{len(paths)} frames (1280x720 -> 448x448 budget) alone takes {prep_s:.1f} s on {os.cpu_count()} cores, in the initial "
            f"and multi-agent stages",
        )
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--latency", type=float, action="append", help="seconds per call (repeatable; default 1 and 5)")
    args = parser.parse_args()
    print_table(run(args.rows, args.iterations, tuple(args.latency or (1.0, 5.0))))
