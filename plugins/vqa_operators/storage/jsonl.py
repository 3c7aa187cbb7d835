"""The one JSONL reader and writer: lines in, rows out, with a reason for every unusable line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from vqa_operators.exceptions import Reason


@dataclass(frozen=True)
class BadLine:
    """A line that is not a JSON object; ``reason`` is a short code, ``detail`` says why."""

    line: int
    reason: Reason
    detail: str
    raw: str


def _json_default(value: Any) -> Any:
    # numpy / pandas scalars (from DataFrames) expose .item(); anything else is a bug worth seeing
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps_line(row: Any) -> bytes:
    """Serialise one row as a UTF-8 JSON line (no ASCII escaping, trailing newline)."""
    return json.dumps(row, ensure_ascii=False, default=_json_default).encode("utf-8") + b"\n"


def read_jsonl(lines: Iterable[bytes], *, first_line: int = 1) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """Yield (line number, row or BadLine) for every line, including blank ones; numbering starts at ``first_line``."""
    for number, raw in enumerate(lines, start=first_line):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, BadLine(number, Reason.NOT_UTF8, f"byte {exc.start} is not valid UTF-8", raw.decode("utf-8", "replace"))
            continue
        if not text.strip():
            yield number, BadLine(number, Reason.BLANK_LINE, "the line is empty", text)
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, BadLine(number, Reason.MALFORMED_JSON, f"{exc.msg} at column {exc.colno}", text)
            continue
        if not isinstance(row, dict):
            yield number, BadLine(number, Reason.NOT_AN_OBJECT, f"a JSON {type(row).__name__} is not a row object", text)
            continue
        yield number, row


class JsonlWriter:
    """Write rows to an open binary file, counting them."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.count = 0

    def write(self, row: Any) -> None:
        """Append one row."""
        self._handle.write(dumps_line(row))
        self.count += 1
