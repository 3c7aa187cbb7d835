"""DAG parse time in the dag-processor, in local and in kubernetes execution mode.

Runs the real ``airflow dag-processor --num-runs 2`` over ``dags/`` in a fresh SQLite home and
reads each DAG's ``last_parse_duration`` (what the processor measured around parsing its file,
in a forked child) from the metadata DB. The second pass is the steady state the processor runs in.

    .venv/bin/python bench/parse_time.py
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from common import ROOT, Result, print_table

AIRFLOW = str(Path(os.sys.executable).with_name("airflow"))


def parse_durations(mode: str) -> dict[str, float]:
    """{dag_id: last parse duration in seconds} after the dag-processor has parsed dags/ twice in ``mode``."""
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VQA_"))}
        env.update(
            {
                "AIRFLOW_HOME": home,
                "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "1",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "0",
                "VQA_EXECUTION": mode,
            }
        )
        for argv in (["db", "migrate"], ["dag-processor", "--num-runs", "2"]):
            proc = subprocess.run([AIRFLOW, *argv], env=env, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"airflow {' '.join(argv)} failed: {proc.stderr[-2000:]}")
        with sqlite3.connect(Path(home) / "airflow.db") as db:
            rows = db.execute("SELECT dag_id, last_parse_duration FROM dag").fetchall()
            errors = db.execute("SELECT filename, stacktrace FROM import_error").fetchall()
    if errors:
        raise RuntimeError(f"import errors in {mode} mode: {errors}")
    return dict(rows)


def own_share(path: Path) -> float:
    """Seconds a fresh process spends importing this project's modules and building the DAG once ``airflow.sdk`` is loaded.

    That is what a parsing child does beyond the processor's own work (fork, serialise, store),
    since the processor pre-imports ``airflow.sdk`` from the DAG file's imports.
    """
    code = (
        f"import time, runpy, airflow.sdk; t = time.perf_counter(); runpy.run_path({str(path)!r}); print(time.perf_counter() - t)"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT / "plugins"),
        "AIRFLOW_HOME": tempfile.gettempdir(),
        "VQA_EXECUTION": "local",
    }
    proc = subprocess.run([os.sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def run() -> list[Result]:
    results = []
    for mode in ("local", "kubernetes"):
        durations = parse_durations(mode)
        worst = max(durations.values())
        figures = ", ".join(f"{dag} {seconds:.2f} s" for dag, seconds in sorted(durations.items()))
        results.append(
            Result(
                f"5. DAG parse time ({mode} mode)",
                f"slowest {worst:.2f} s",
                "< 0.3 s per file",
                worst < 0.3,
                f"dag-processor: {figures}",
            )
        )
    shares = ", ".join(f"{path.stem} {own_share(path) * 1000:.0f} ms" for path in sorted((ROOT / "dags").glob("*.py")))
    results.append(
        Result(
            "5. the DAG file's own share",
            shares,
            "reported",
            None,
            "this project's imports and the DAG's construction; the rest is the processor's",
        )
    )
    return results


if __name__ == "__main__":
    print_table(run())
