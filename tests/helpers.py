"""Helpers of the tests (fixtures live in conftest.py; what the benchmarks share too, in testkit/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m vqa_operators run ARGS`` in a child process; its output captured."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vqa_operators", "run", *args], capture_output=True, text=True, env=full_env, timeout=120, check=False
    )


def checkpointed_rows(folder: Path) -> int:
    """Rows saved in every checkpoint part under ``folder``."""
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.checkpoint/**/part-*.jsonl"))
