"""Error classes: which failures are the job's (fail the task, let Airflow retry) and which are a row's."""

from __future__ import annotations


class VQAError(Exception):
    """Base class for every error this package raises on purpose."""


class JobError(VQAError):
    """A failure of the whole job: the worker exits non-zero and Airflow retries the task."""

    exit_code = 1


class ConfigError(JobError, ValueError):
    """Bad configuration (unknown generator, missing base URL, model not served). Fails before any spend."""

    exit_code = 2


class InputError(JobError):
    """The input cannot be read at all (missing object, access denied, not a file)."""

    exit_code = 3


class ServerUnavailableError(JobError):
    """The model server stayed unreachable (or kept failing) after the client's retries."""

    exit_code = 4


class StorageError(JobError):
    """Object storage failed for the job as a whole (endpoint unreachable, upload refused)."""

    exit_code = 5


class RowError(VQAError):
    """One row cannot be processed; it goes to the errors file with ``reason`` and ``detail``."""

    def __init__(self, reason: str, detail: str, *, raw_output: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.raw_output = raw_output
