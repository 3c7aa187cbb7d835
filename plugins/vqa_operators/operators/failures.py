"""The one mapping from the job errors to Airflow's verdicts, used by every operator: plan, worker, pod, merge and export.

A failure another try would meet again (``exceptions.FAIL_WITHOUT_RETRY``: bad configuration, an
input that cannot be read or changed after it was planned, a dataset that cannot be exported)
fails the task at once, without retries. Everything else propagates, so Airflow retries it with
backoff and the next try resumes from the checkpoint. A pod reports the same errors by exit code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vqa_operators.exceptions import FAIL_WITHOUT_RETRY, JobError


def final_error_for_exit_code(code: int | None) -> type[JobError] | None:
    """The job error a worker's exit code stands for, if no retry can fix it (2, 3), else None."""
    return next((cls for cls in FAIL_WITHOUT_RETRY if cls.exit_code == code), None)


@contextlib.contextmanager
def fail_fast(prefix: str = "") -> Iterator[None]:
    """Inside the block, a job error no retry can fix becomes an ``AirflowFailException`` that names it; the rest propagate."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except FAIL_WITHOUT_RETRY as err:
        raise AirflowFailException(f"{prefix}{type(err).__name__}: {err}") from err
