"""Task callbacks: one line in the task log when a try fails, saying which try, why, and what it had done.

Airflow calls ``on_retry_callback`` when a failed try will be retried and ``on_failure_callback``
when the task has failed for good. The line names the task (with its shard), the try out of the
tries allowed, the error's first line, and, when the worker ran in this process, the rows that
try finished (checkpointed, so the next try reuses them) and its failures by reason.
"""

from __future__ import annotations

import logging
from typing import Any

from vqa_operators.exceptions import JobError

log = logging.getLogger("vqa_operators.callbacks")


def summary(context: Any, outcome: str) -> str:
    """``image_qa.generate[2] try 1 of 4 failed, will retry: ServerUnavailableError: ...; 160/400 rows finished (120 this try, 40 reused), 3 failed {...}``."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    name = f"{ti.dag_id}.{ti.task_id}" + (f"[{map_index}]" if map_index is not None and map_index >= 0 else "")
    tries = (getattr(ti, "max_tries", None) or 0) + 1
    error = context.get("exception")
    reason = "no exception recorded"
    if error is not None:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    line = f"{name} try {ti.try_number} of {tries} {outcome}: {reason}"
    # the worker's JobError, raised here or as the cause of the Airflow exception that fails the task
    job_error = next((e for e in (error, getattr(error, "__cause__", None)) if isinstance(e, JobError)), None)
    if job_error is not None and job_error.progress is not None:
        # rows finished in any order are checkpointed: the next try reuses exactly these
        line += f"; {job_error.progress.summary()}"
    return line


def on_task_retry(context: Any) -> None:
    """``on_retry_callback``: the failed try, in one line."""
    log.warning("%s", summary(context, "failed, will retry"))


def on_task_failure(context: Any) -> None:
    """``on_failure_callback``: the last try, in one line."""
    log.error("%s", summary(context, "failed for good"))
