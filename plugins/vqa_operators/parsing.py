"""Pure functions that turn a model's text into validated data, or say precisely why they cannot."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

_CLOSER_AHEAD = re.compile(r"[ \t\r\n]*[}\]]")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


class ParseError(ValueError):
    """The model's output is not usable; the message is the detail recorded for the row.

    ``reason`` is the errors-file reason code if the output is still unusable after the repair:
    ``invalid_json``, ``truncated_output`` (cut off, usually by ``max_tokens``), ``schema_mismatch``,
    or a generator's own rule.
    """

    def __init__(self, message: str, *, reason: str = "invalid_json") -> None:
        super().__init__(message)
        self.reason = reason


def _outside_strings(text: str, start: int = 0) -> Iterator[tuple[int, str, bool]]:
    """Yield (index, char, inside_a_string) for ``text[start:]``, following JSON string escapes."""
    in_string, escaped = False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        yield i, ch, in_string


def _scan(text: str, start: int) -> tuple[int, bool]:
    """Return (bracket depth, inside-a-string) at the end of ``text`` scanned from ``start``."""
    depth, in_string = 0, False
    for _, ch, in_string in _outside_strings(text, start):
        if in_string:
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return 0, False
    return depth, in_string


def _strip_trailing_commas(text: str) -> str:
    """Remove commas that directly precede ``}`` or ``]`` outside of strings."""
    drop = set()
    for i, ch, in_string in _outside_strings(text):
        if ch == "," and not in_string and _CLOSER_AHEAD.match(text, i + 1):
            drop.add(i)
    return "".join(ch for i, ch in enumerate(text) if i not in drop)


def extract_json(text: str, *, truncated: bool = False) -> Any:
    """Return the first JSON object or array in ``text``, tolerating code fences, prose and trailing commas.

    ``truncated`` says the server stopped on its token limit; it makes the error say so.
    """
    body = (text or "").strip()
    if not body:
        raise ParseError("empty output")
    fence = _FENCE.search(body)
    if fence:
        body = fence.group(1).strip()
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if not starts:
        raise ParseError("no JSON object in output")
    start = min(starts)
    decoder = json.JSONDecoder()
    try:
        return decoder.raw_decode(body, start)[0]
    except json.JSONDecodeError as first:
        try:
            return decoder.raw_decode(_strip_trailing_commas(body), start)[0]
        except json.JSONDecodeError:
            pass
        depth, in_string = _scan(body, start)
        if truncated or depth > 0 or in_string:
            limit = " (the server hit max_tokens)" if truncated else ""
            raise ParseError(f"truncated JSON: output ended before the value was closed{limit}", reason="truncated_output") from None
        raise ParseError(f"invalid JSON: {first.msg} at char {first.pos}") from None


def describe_validation_error(err: ValidationError, limit: int = 4) -> str:
    """Summarise a pydantic error as ``path: message; ...`` (at most ``limit`` entries)."""
    parts = []
    for e in err.errors()[:limit]:
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    more = len(err.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_structured(text: str, model: type[M], *, truncated: bool = False) -> M:
    """Extract JSON from ``text`` and validate it against ``model``; raise ParseError with the reason."""
    data = extract_json(text, truncated=truncated)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ParseError(f"output does not match the schema: {describe_validation_error(err)}", reason="schema_mismatch") from None
