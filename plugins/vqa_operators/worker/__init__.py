"""The worker: ``python -m vqa_operators run <generator> --input URI --output URI [...]``.

The one entry point that a Kubernetes pod runs and that an in-process Airflow task calls
(``run_job``). Every input line ends in exactly one place: the output JSONL (input fields +
generated fields + provenance) or the errors JSONL (input + reason). Both files are written
atomically at the end. The last stdout line is a JSON manifest. Job-level failures exit non-zero
with a one-line message, so that Airflow retries the task (or, for a configuration error or an
unreadable input, fails it at once).

Finished rows are checkpointed as the run goes (``storage/checkpoint.py``). A rerun of the same
task with the same settings reuses them and sends only the other rows to the model; the manifest
reports ``rows_reused``. A rerun after full success makes no model call and writes nothing.
SIGTERM or SIGINT stops the run the same way a failure does: no new rows, the finished ones
checkpointed, the requests in flight cancelled.

Its rooms: ``options`` (what a run is given, checked before any I/O), ``run_loop`` (rows through
the generator, progress, records, checkpoints), ``backends`` (which model server) and ``cli``.
"""

from __future__ import annotations

from vqa_operators.lazy import lazy_exports

# imported on first use: a DAG file that reads JobOptions (its params' bounds) does not load the run loop
_EXPORTS = {
    "JobOptions": "vqa_operators.worker.options",
    "check_options": "vqa_operators.worker.options",
    "validate_spec": "vqa_operators.worker.options",
    "run_job": "vqa_operators.worker.run_loop",
    "settings_fingerprint": "vqa_operators.worker.run_loop",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
