"""Error classes: which failures are the job's (fail the task, let Airflow retry) and which are a row's."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import StrEnum


class Reason(StrEnum):
    """Every reason code a row can go to the errors file with (README lists them all; a test checks)."""

    MALFORMED_JSON = "malformed_json"  # the line is not JSON
    NOT_AN_OBJECT = "not_an_object"  # the line is JSON but not an object
    BLANK_LINE = "blank_line"  # the line is empty
    NOT_UTF8 = "not_utf8"  # the line is not UTF-8
    MISSING_FIELD = "missing_field"  # a field the generator needs is absent or null
    BAD_FIELD = "bad_field"  # a field has the wrong type or shape
    PROMPT_TOO_LONG = "prompt_too_long"  # the prompt's text exceeds max_prompt_chars; nothing is sent
    IMAGE_NOT_FOUND = "image_not_found"  # an image does not exist
    IMAGE_UNREADABLE = "image_unreadable"  # an image cannot be read (permissions, S3 AccessDenied)
    BAD_IMAGE = "bad_image"  # an image cannot be decoded safely
    PATH_NOT_ALLOWED = "path_not_allowed"  # an image or video lies outside the allowed media roots
    VIDEO_NOT_FOUND = "video_not_found"  # video_ingest: the video file does not exist
    VIDEO_UNREADABLE = (
        "video_unreadable"  # video_ingest: the file cannot be read or decoded (corrupt, truncated, empty, S3 AccessDenied)
    )
    NO_VIDEO_STREAM = "no_video_stream"  # video_ingest: the file holds no video stream (audio only)
    UNSUPPORTED_CODEC = "unsupported_codec"  # video_ingest: FFmpeg has no decoder for the video's codec
    BAD_DIMENSIONS = "bad_dimensions"  # video_ingest: a side of the picture is below min or above max pixels
    VIDEO_TOO_LONG = "video_too_long"  # video_ingest: longer than max_video_s
    REQUEST_REJECTED = "request_rejected"  # the server refused this one request (HTTP 400/413/422)
    EMPTY_RESPONSE = "empty_response"  # the server answered with no choices
    TRUNCATED_OUTPUT = "truncated_output"  # the answer was cut off (max_tokens), after one repair
    INVALID_JSON = "invalid_json"  # the answer is not JSON, after one repair
    SCHEMA_MISMATCH = "schema_mismatch"  # the answer breaks the schema, after one repair
    ANSWER_MISSING_TAG = "answer_missing_tag"  # pers_qa: the answer does not start with the tag, after one repair
    DUPLICATE_EXPERT = (
        "duplicate_expert"  # video_qa_multiagent: the master named a recruited role again; the rounds stop and the row is kept
    )


class Rejection(StrEnum):
    """Every reason a quality decision drops a pair with (the rejected file's ``reason``; README lists them all; a test checks)."""

    ANSWERABLE_BLIND = "answerable_blind"  # quality: the model answered the question correctly without the images
    NOT_GROUNDED = (
        "not_grounded"  # quality: the model judged the pair not grounded in the images, or scored it below min_judge_score
    )
    NEAR_DUPLICATE = "near_duplicate"  # merge: the question is a near-duplicate of an earlier one in the run (the first is kept)


@dataclass(frozen=True)
class TryProgress:
    """What a failed try had done: the rows it finished are checkpointed, and the next try reuses them."""

    rows_total: int | None = None
    rows_done: int = 0
    rows_finished: int = 0
    rows_reused: int = 0
    rows_failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """``160/400 rows finished (120 this try, 40 reused), 3 failed {...}``."""
        total = f"/{self.rows_total}" if self.rows_total else ""
        return (
            f"{self.rows_finished + self.rows_reused}{total} rows finished ({self.rows_finished} this try, {self.rows_reused} reused),"
            f" {self.rows_failed} failed {self.failures_by_reason}"
        )


class VQAError(Exception):
    """Base class for every error this package raises on purpose."""


class JobError(VQAError):
    """A failure of the whole job: the worker exits non-zero and Airflow retries the task."""

    exit_code = 1
    # what the try had done when it failed (set by the worker's run loop; None before any row ran)
    progress: TryProgress | None = None


class UnexpectedError(JobError):
    """Any other exception out of a run (a bug, an unforeseen library error): the cause keeps the traceback."""


class Interrupted(JobError):
    """SIGTERM or SIGINT (a preempted node, an evicted pod, a stopped task): the run stopped and kept what it finished."""

    def __init__(self, received: signal.Signals, detail: str = "") -> None:
        super().__init__(f"{received.name}: stopped{': ' + detail if detail else ''}")
        self.signal = received
        # the shell's convention: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)
        self.exit_code = 128 + int(received)


class ConfigError(JobError, ValueError):
    """Bad configuration (unknown generator, missing base URL, model not served). Fails before any spend."""

    exit_code = 2


class InputError(JobError):
    """The input cannot be read at all (missing object, access denied, not a file)."""

    exit_code = 3


class ExportError(JobError):
    """The merged dataset cannot be exported as asked (a damaged merged file, an image gone since generation)."""

    exit_code = 3


# Failures another try would meet again, so the task fails at once in every operator (plan, worker,
# pod, merge, export): bad configuration (2), an input that cannot be read at all or changed after it
# was planned (3), and a merged dataset that cannot be exported (3). The plan task read the input
# moments before, so a missing or forbidden object in the worker is not a hiccup: a transient S3
# failure is a StorageError (5) and is retried. operators/failures.py applies this one mapping.
FAIL_WITHOUT_RETRY: tuple[type[JobError], ...] = (ConfigError, InputError, ExportError)


class ServerUnavailableError(JobError):
    """The model server stayed unreachable (or kept failing) after the client's retries."""

    exit_code = 4


class StorageError(JobError):
    """Object storage failed for the job as a whole (endpoint unreachable, upload refused)."""

    exit_code = 5


class RowError(VQAError):
    """One row cannot be processed; it goes to the errors file with ``reason`` and ``detail``."""

    def __init__(self, reason: Reason, detail: str, *, raw_output: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.raw_output = raw_output
