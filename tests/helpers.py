"""Helpers of the tests (fixtures live in conftest.py; what the benchmarks share too, in testkit/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m vqa_operators run ARGS`` in a child process; its output captured."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vqa_operators", "run", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )


def checkpointed_rows(folder: Path) -> int:
    """Rows saved in every checkpoint part under ``folder``."""
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.checkpoint/**/part-*.jsonl"))


def run_manifest(
    generator: str, output: str | Path, *, rows_in: int, rows_out: int, rows_failed: int = 0, **fields: object
) -> Any:
    """A one-stage run's ``records.RunManifest`` for ``output`` (its errors file beside it, as ``merge_run`` names it), as
    the preview and the export read it."""
    from vqa_operators.records import RunManifest, StageSummary
    from vqa_operators.storage.uris import beside

    output = str(output)
    errors = f"{output.rsplit('/', 1)[0]}/generate.errors.jsonl"
    stage = StageSummary(
        generator=generator,
        shards=1,
        output=output,
        errors=errors,
        rejected=None,
        model="m",
        prompt_sha256="ab" * 32,
        seed=1,
        slowest_shard_s=1.0,
        rows_in=rows_in,
        rows_out=rows_out,
        rows_failed=rows_failed,
    )
    return RunManifest(
        **{
            "generator": generator,
            "shards": 1,
            "input": "in.jsonl",
            "output": output,
            "errors": {"generate": errors},
            "rejected": None,
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rows_failed": rows_failed,
            "acceptance_rate": None,
            "near_duplicates": None,
            "quality_scores": None,
            "cost_per_kept_pair": None,
            "stages": {"generate": stage},
            "estimate": None,
            "manifest": beside(output, ".manifest.json"),
            "preview": beside(output, ".preview.html"),
            **fields,
        }
    )


def wait_for_progress(stderr: Any, generator: str, rows: int) -> list[str]:
    """Read a worker's log (a text stream) until a progress line of ``generator`` reports at least ``rows`` rows done; return the lines read."""
    seen = []
    for line in stderr:
        seen.append(line)
        head = line.split(f"{generator}: ", 1)[-1]
        if (
            " rows" in head
            and head.split(" ", 1)[0].split("/", 1)[0].isdigit()
            and int(head.split(" ", 1)[0].split("/", 1)[0]) >= rows
        ):
            return seen
    raise AssertionError("the worker ended before it reported progress:\n" + "".join(seen))
