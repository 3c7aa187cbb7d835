"""Helpers for tests that run the real ``airflow`` CLI against this repository's dags/ and plugins/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def airflow_env(
    home: Path, *, s3_endpoint: str, vlm_base_url: str, model: str, api_key: str = "sk-airflow-secret-456"
) -> dict[str, str]:
    """Environment for an isolated Airflow on SQLite that sees this project and the local servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VQA_", "AWS_"))}
    env.update(
        {
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "login": "testing-key-id",
                    "password": "testing-secret-value",
                    "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
                }
            ),
            "AIRFLOW_CONN_VQA_VLM": json.dumps(
                {"conn_type": "http", "host": vlm_base_url, "password": api_key, "extra": {"model": model}}
            ),
            "VQA_EXECUTION": "local",
            "VQA_RETRY_DELAY_SECONDS": "3",  # a failing task fails the test in seconds, not minutes
        }
    )
    return in_home(env, home)


def in_home(env: dict[str, str], home: Path) -> dict[str, str]:
    """``env`` for an Airflow whose home, and SQLite database, is ``home``.

    SQLite's busy timeout is 60 s (pysqlite's default is 5): a CLI command beside the running
    scheduler (``backfill create``) waits for its write lock instead of failing with "database is locked".
    """
    return {**env, "AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db?timeout=60"}


def airflow(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``airflow <args>`` and capture its output."""
    return subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
