"""Rows accounted for under model-server fault mixes, and model calls saved when a failed run resumes.

Runs the real worker (``run_job``) against the OpenAI-compatible TEST DOUBLE (not a model) with
faults injected at the rates below, on generated images in a temporary folder, and prints a
Markdown table. Nothing here is timed against a target: it measures that no row is lost or
duplicated, and how many calls a resume saves.

    .venv/bin/python bench/faults.py [--rows 200] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

from testkit.data import MODEL, job_options, write_image_rows  # noqa: E402
from testkit.openai_server import OpenAITestServer, outage_after  # noqa: E402
from vqa_operators.exceptions import ServerUnavailableError  # noqa: E402
from vqa_operators.serving import openai_api  # noqa: E402
from vqa_operators.worker import JobOptions, run_job  # noqa: E402

MIXES: dict[str, dict[str, float]] = {
    "none": {},
    "transient 20%": {"429": 0.04, "500": 0.04, "503": 0.04, "drop": 0.04, "timeout": 0.04},
    "transient 50%": {"429": 0.1, "500": 0.1, "503": 0.1, "drop": 0.15, "timeout": 0.05},
    "content 30%": {"truncated": 0.1, "invalid_json": 0.1, "schema_mismatch": 0.1},
    "everything 40%": {
        "429": 0.05,
        "500": 0.05,
        "503": 0.05,
        "drop": 0.05,
        "timeout": 0.05,
        "truncated": 0.05,
        "invalid_json": 0.05,
        "schema_mismatch": 0.05,
    },
}


def options(server: OpenAITestServer, folder: Path, source: Path, output: str, concurrency: int, **extra: object) -> JobOptions:
    """The tests' image_qa run, with more retries and no outage breaker unless asked for."""
    settings = {
        "output": str(folder / output),
        "concurrency": concurrency,
        "seed": 1,
        "max_retries": 8,
        "max_consecutive_failures": 10_000,
        **extra,
    }
    return job_options(server, folder, source, **settings)


def accounted(folder: Path, output: str, rows: int) -> tuple[bool, int]:
    """(every id exactly once across output and errors, number of ids found)."""
    out = folder / output
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    ids += [json.loads(line)["row"]["id"] for line in out.with_name(out.stem + ".errors.jsonl").read_text().splitlines()]
    return sorted(ids) == list(range(rows)), len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    openai_api.RETRY_BASE_DELAY_S = 0.02  # the backoff's shape, scaled down: this measures accounting, not waiting
    server = OpenAITestServer(MODEL).start()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = write_image_rows(folder, args.rows)
        print(f"## Fault mixes: {args.rows} image_qa rows, concurrency {args.concurrency}, max_retries 8, one repair\n")
        print(
            "| mix | faults injected | tries (a job error is retried, as Airflow would) | rows in | out | errors | "
            "accounted (each id once) | reused by the last try | requests, all tries | error reasons |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for number, (name, rates) in enumerate(MIXES.items()):
            server.reset()
            server.inject(rates, seed=11)
            output = f"mix-{number}.jsonl"  # each mix its own output: the same one would resume from the last
            tries = 0
            while True:
                tries += 1
                try:
                    manifest = run_job(options(server, folder, source, output, args.concurrency))
                    break
                except ServerUnavailableError:
                    if tries == 5:
                        raise
            ok, found = accounted(folder, output, args.rows)
            injected = sum(server.injected.values())
            print(
                f"| {name} | {injected} | {tries} | {manifest['rows_in']} | {manifest['rows_out']} | {manifest['rows_failed']} | "
                f"{'yes' if ok else 'NO'} ({found}) | {manifest['rows_reused']} | {len(server.requests)} | {manifest['failures_by_reason'] or '-'} |"
            )

        print(f"\n## Resume after an outage: {args.rows} rows, the server goes down after a share of them\n")
        print(
            "| outage after | try 1 | rows reused by try 2 | try 2 requests | clean-run requests | calls saved | output identical to a clean run |"
        )
        print("|---|---|---|---|---|---|---|")
        server.reset()
        clean = run_job(options(server, folder, source, "clean.jsonl", args.concurrency))
        clean_bytes = (folder / "clean.jsonl").read_bytes()
        for share in (0.25, 0.5, 0.9):
            server.reset()
            server.responder = outage_after(int(args.rows * share))
            output = f"resume-{share}.jsonl"
            opts = options(server, folder, source, output, args.concurrency, max_consecutive_failures=10, checkpoint_every=16)
            started = time.monotonic()
            try:
                run_job(opts)
                first = "finished (no outage?)"
            except ServerUnavailableError:
                first = f"failed fast in {time.monotonic() - started:.1f} s"
            server.reset()
            again = run_job(opts)
            same = (folder / output).read_bytes() == clean_bytes
            saved = 1 - again.requests / clean.requests
            print(
                f"| {share:.0%} of rows | {first} | {again['rows_reused']} | {again['requests']} | {clean['requests']} "
                f"| {saved:.0%} | {'yes' if same else 'NO'} |"
            )
    server.stop()


if __name__ == "__main__":
    main()
