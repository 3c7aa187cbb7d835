"""Server saturation: image QA on 1920x1080 JPEGs against a simulated 32-slot x 1.0 s continuous-batching server.

Capacity is slots / latency requests per second. The figure is achieved throughput / capacity
over the generation span (the server's first request to its last answer), and over the whole
worker run (start-up, input reading and output writing included). The same rows are then sent
by a 10-thread pool client, as the original toolkit's client does, and the worker's concurrency
is swept to show how to size it.

    .venv/bin/python bench/saturation.py [--rows 256] [--slots 32] [--latency 1.0]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import MODEL, Result, SimServer, print_table, sim_server, write_jsonl, write_photos

from vqa_operators import settings
from vqa_operators.media import prepare_image
from vqa_operators.settings import default_concurrency
from vqa_operators.worker import JobOptions, run_job


def worker_run(
    server: SimServer, folder: Path, source: Path, slots: int, concurrency: int | None, tag: str
) -> tuple[float, float, dict]:
    """(server-side span ratio, whole-run ratio, server stats) for one worker run."""
    server.stats(reset=True)
    opts = JobOptions(
        generator="image_qa",
        input=str(source),
        output=str(folder / f"out-{tag}.jsonl"),
        base_url=server.base_url,
        model=MODEL,
        media_root=str(folder / "media"),
        max_num_seqs=slots,
        concurrency=concurrency,
        seed=1,
        params={"pairs_per_row": 2},
    )
    started = time.monotonic()
    manifest = run_job(opts)
    wall = time.monotonic() - started
    stats = server.stats()
    assert manifest.rows_out == stats["requests"], (manifest, stats)
    capacity = stats["slots"] / stats["latency"]
    return stats["requests"] / stats["span_s"] / capacity, stats["requests"] / wall / capacity, stats


def thread_pool_run(server: SimServer, folder: Path, rows: list[dict], slots: int, latency: float) -> float:
    """The original toolkit's client: 10 threads, each preparing its row's image and then waiting on its request."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=300)

    def one(row: dict) -> None:
        image = prepare_image((folder / "media" / row["image"]).read_bytes(), source=row["image"], max_pixels=settings.MAX_PIXELS)
        client.chat.completions.create(
            model=MODEL,
            max_tokens=512,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image.data_url}},
                        {"type": "text", "text": "Ask and answer two questions."},
                    ],
                }
            ],
        )

    server.stats(reset=True)
    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(one, rows))
    stats = server.stats()
    return stats["requests"] / stats["span_s"] / (slots / latency)


def client_ceiling(folder: Path, source: Path) -> tuple[float, float]:
    """(rows/s, worker CPU ms per row) of the worker against an unlimited, zero-latency server: what this machine can feed."""
    with sim_server(slots=None, latency=0.0) as fast:
        opts = JobOptions(
            generator="image_qa",
            input=str(source),
            output=str(folder / "ceiling.jsonl"),
            base_url=fast.base_url,
            model=MODEL,
            media_root=str(folder / "media"),
            concurrency=64,
            seed=1,
            params={"pairs_per_row": 2},
        )
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        manifest = run_job(opts)
        wall, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return manifest.rows_in / wall, 1000 * cpu / manifest.rows_in


def run(rows: int = 256, slots: int = 32, latency: float = 1.0, sweep: bool = True) -> list[Result]:
    logging.getLogger("vqa_operators").setLevel(logging.WARNING)
    capacity = slots / latency
    with tempfile.TemporaryDirectory() as tmp, sim_server(slots=slots, latency=latency) as server:
        folder = Path(tmp)
        names = write_photos(folder / "media", 32, (1920, 1080))
        data = [{"id": i, "image": names[i % len(names)]} for i in range(rows)]
        source = write_jsonl(folder / "in.jsonl", data)
        derived = default_concurrency(slots)
        span_ratio, run_ratio, stats = worker_run(server, folder, source, slots, None, "default")
        ceiling, cpu_ms = client_ceiling(folder, source)
        bound = min(capacity, ceiling)
        results = [
            Result(
                "1. saturation, generation span",
                f"{span_ratio:.3f} of capacity",
                ">= 0.90",
                span_ratio >= 0.90,
                f"{rows} rows of 1920x1080 JPEG, {slots} slots x {latency:.1f} s = {capacity:.0f} req/s; concurrency {derived} "
                f"(derived from max_num_seqs {slots}); span {stats['span_s']:.2f} s; peak in flight {stats['peak_concurrency']}",
            ),
            Result(
                "1. the same, against what this machine can feed",
                f"{span_ratio * capacity / bound:.3f} of min(capacity, client ceiling)",
                "reported",
                None,
                f"client ceiling {ceiling:.1f} rows/s = {ceiling / capacity:.2f} of capacity ({cpu_ms:.0f} ms of worker CPU per row, "
                f"{os.cpu_count()} cores shared with the simulated server)",
            ),
            Result(
                "1. saturation, whole worker run",
                f"{run_ratio:.3f} of capacity",
                "reported",
                None,
                "start-up, input reading and output writing included",
            ),
        ]
        small = write_photos(folder / "media", 32, (1280, 720))  # within the budget: sent as they are
        fits = write_jsonl(folder / "fits.jsonl", [{"id": i, "image": small[i % len(small)]} for i in range(rows)])
        fit_ratio, _, fit_stats = worker_run(server, folder, fits, slots, None, "fits")
        results.append(
            Result(
                "1. saturation, 1280x720 JPEG (sent as is)",
                f"{fit_ratio:.3f} of capacity",
                ">= 0.90",
                fit_ratio >= 0.90,
                f"same server and concurrency; span {fit_stats['span_s']:.2f} s; peak in flight {fit_stats['peak_concurrency']}",
            )
        )
        pool_ratio = thread_pool_run(server, folder, data, slots, latency)
        results.append(
            Result(
                "1. 10-thread pool client (original toolkit)",
                f"{pool_ratio:.3f} of capacity",
                "reported",
                None,
                "same rows, same server",
            )
        )
        if sweep:
            figures = []
            for concurrency in (slots // 2, slots, 2 * slots):
                ratio, _, _ = worker_run(server, folder, fits, slots, concurrency, f"c{concurrency}")
                figures.append(f"{concurrency}: {ratio:.2f}")
            results.append(
                Result(
                    "7. concurrency sweep, 1280x720 (span ratio)",
                    "; ".join(figures),
                    "reported",
                    None,
                    f"the default, {derived} = max_num_seqs + 1/4, is the first line above",
                )
            )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--latency", type=float, default=1.0)
    args = parser.parse_args()
    print_table(run(args.rows, args.slots, args.latency))
