"""Checkpoints: finished rows saved as a run goes, so a retry reuses them instead of asking the model again.

A checkpoint lives beside the output, under ``<output name>.checkpoint/<task>/<fingerprint>/``:

- ``<task>`` is the task's identity (dag id, task id, run id, map index) when Airflow runs the
  worker, or ``cli`` for a worker run by hand;
- ``<fingerprint>`` hashes everything that decides a row's result (generator, options, prompt
  templates, model, sampling parameters, image budget), so changing any of them starts afresh.

It is a set of immutable parts, ``part-<time>-<writer>-<seq>.jsonl``. Each part is one atomic
write with ``If-None-Match: *`` under a name no other writer uses, so overlapping tries never
overwrite each other's parts. Each line is a ``Finished`` record: the row's final result (kept,
rejected by a quality decision, or failed). The worker writes records through ``Finished`` and the
loader reads them back through it, so one rule decides what a finished row is. On load, records
are indexed by key in a SQLite file on local disk, so memory stays flat however many rows are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import tempfile
import time
import uuid
from typing import Any

from pydantic import ValidationError

from vqa_operators import settings
from vqa_operators.records import Finished
from vqa_operators.storage.jsonl import JsonlWriter, read_jsonl
from vqa_operators.storage.uris import Storage, beside

log = logging.getLogger("vqa_operators.checkpoint")

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+:-]+")


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of the settings that decide each row's result."""
    canonical = json.dumps(settings, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def checkpoint_prefix(output_uri: str, task: str | None, settings_hash: str) -> str:
    """``<output name>.checkpoint/<task>/<fingerprint>/``, with each identity part made path-safe."""
    parts = [_UNSAFE.sub("_", p) or "_" for p in (task or "cli").split("/")]
    return beside(output_uri, f".checkpoint/{'/'.join(parts)}/{settings_hash}/")


class Checkpoint:
    """Finished records by row key: loaded from earlier tries, added to as rows finish, flushed in parts."""

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        *,
        every_rows: int = settings.CHECKPOINT_EVERY,
        every_seconds: float = settings.CHECKPOINT_SECONDS,
    ) -> None:
        self.storage = storage
        self.prefix = prefix
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self.writer = uuid.uuid4().hex[:8]
        self.loaded = 0
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self._dir = tempfile.TemporaryDirectory(prefix="vqa-checkpoint-")
        self._db = sqlite3.connect(f"{self._dir.name}/index.sqlite3")
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; CREATE TABLE done (key TEXT PRIMARY KEY, record TEXT NOT NULL);"
        )

    def load(self) -> int:
        """Index every record of earlier tries; return how many rows they finished."""
        skipped = 0
        for uri in self.storage.list(self.prefix):
            if not uri.rsplit("/", 1)[-1].startswith("part-"):
                continue
            for _, item in read_jsonl(self.storage.iter_lines(uri)):
                key = item.pop("key", None) if isinstance(item, dict) else None
                try:
                    if not isinstance(key, str):
                        raise ValueError("no key")
                    record = Finished.model_validate(item)
                except (ValueError, ValidationError):
                    skipped += 1
                    continue
                self._db.execute(
                    "INSERT OR REPLACE INTO done VALUES (?, ?)", (key, record.model_dump_json(exclude_defaults=True))
                )
        if skipped:
            log.warning("checkpoint %s: %d unusable record(s) ignored; their rows will be generated again", self.prefix, skipped)
        self.loaded = self._db.execute("SELECT COUNT(*) FROM done").fetchone()[0]
        return self.loaded

    def get(self, key: str) -> Finished | None:
        """The finished record for ``key``, or None."""
        found = self._db.execute("SELECT record FROM done WHERE key = ?", (key,)).fetchone()
        return Finished.model_validate_json(found[0]) if found else None

    def add(self, key: str, record: Finished) -> None:
        """Keep a newly finished record; write a part when enough rows or time have gone by."""
        self._buffer.append(record.line(key))
        if len(self._buffer) >= self.every_rows or time.monotonic() - self._last_flush >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as one new part (nothing if the buffer is empty)."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        self._seq += 1
        name = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{self.writer}-{self._seq:06d}.jsonl"
        with self.storage.open_atomic(self.prefix + name, exclusive=True) as handle:
            writer = JsonlWriter(handle)
            for record in self._buffer:
                writer.write(record)
        self._buffer.clear()

    def close(self) -> None:
        """Drop the local index."""
        self._db.close()
        self._dir.cleanup()
