"""Quality-stage saturation: the quality gate on image_qa rows against a simulated 32-slot x 1.0 s server.

Each row holds 1280x720 JPEG and ``pairs`` QA pairs; with both checks on, each pair takes three
requests one after another (blind answer, agreement verdict, then grounding with the image), so a
row alone would keep at most ``pairs`` slots busy. Saturation needs requests from many rows in
flight together. The simulated server keeps every pair (its default verdicts), so every pair
costs three requests. The figure is achieved requests per second / capacity over the generation
span (the server's first request to its last answer), as in ``bench/saturation.py``.

    .venv/bin/python bench/quality.py [--rows 256] [--pairs 3] [--slots 32] [--latency 1.0]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from common import MODEL, Result, print_table, sim_server, write_jsonl, write_photos

from vqa_operators.settings import default_concurrency
from vqa_operators.worker import JobOptions, run_job


def run(rows: int = 256, pairs: int = 3, slots: int = 32, latency: float = 1.0) -> list[Result]:
    logging.getLogger("vqa_operators").setLevel(logging.WARNING)
    capacity = slots / latency
    with tempfile.TemporaryDirectory() as tmp, sim_server(slots=slots, latency=latency) as server:
        folder = Path(tmp)
        names = write_photos(folder / "media", 32, (1280, 720))
        data = [
            {
                "id": i,
                "image": names[i % len(names)],
                "qa_pairs": [
                    {"question": f"Question {j} about photo {i}?", "answer": f"Answer {j} for photo {i}."} for j in range(pairs)
                ],
            }
            for i in range(rows)
        ]
        source = write_jsonl(folder / "generated.jsonl", data)
        server.stats(reset=True)
        opts = JobOptions(
            generator="quality",
            input=str(source),
            output=str(folder / "kept.jsonl"),
            base_url=server.base_url,
            model=MODEL,
            media_root=str(folder / "media"),
            max_num_seqs=slots,
            seed=1,
            params={"source": "image_qa"},
        )
        started = time.monotonic()
        manifest = run_job(opts)
        wall = time.monotonic() - started
        stats = server.stats()
    expected = rows * pairs * 3
    assert manifest.rows_out == rows and manifest.pairs_kept == rows * pairs and stats["requests"] == expected, (
        manifest,
        stats,
    )
    span_ratio = stats["requests"] / stats["span_s"] / capacity
    run_ratio = stats["requests"] / wall / capacity
    return [
        Result(
            "9. quality stage saturation, generation span",
            f"{span_ratio:.3f} of capacity",
            ">= 0.90",
            span_ratio >= 0.90,
            f"{rows} rows x {pairs} pairs x 3 requests (blind, agreement, grounding) = {expected} requests; {slots} slots x {latency:.1f} s "
            f"= {capacity:.0f} req/s; concurrency {default_concurrency(slots)}; span {stats['span_s']:.2f} s; peak in flight {stats['peak_concurrency']}",
        ),
        Result(
            "9. quality stage saturation, whole worker run",
            f"{run_ratio:.3f} of capacity",
            "reported",
            None,
            "start-up, input reading and output writing included",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--latency", type=float, default=1.0)
    args = parser.parse_args()
    print_table(run(args.rows, args.pairs, args.slots, args.latency))
