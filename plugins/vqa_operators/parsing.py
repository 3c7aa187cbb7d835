"""Pure functions that turn a model's text into validated data, or say precisely why they cannot."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vqa_operators.exceptions import Reason

M = TypeVar("M", bound=BaseModel)

_CLOSER_AHEAD = re.compile(r"[ \t\r\n]*[}\]]")
# control characters that are never text, escaped or not (tab, newline and CR are whitespace), and U+FFFD
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffd]")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


class ParseError(ValueError):
    """The model's output is not usable; the message is the detail recorded for the row.

    ``reason`` is the errors-file reason code if the output is still unusable after the repair:
    ``invalid_json``, ``truncated_output`` (cut off, usually by ``max_tokens``), ``schema_mismatch``,
    or a generator's own rule.
    """

    def __init__(self, message: str, *, reason: Reason = Reason.INVALID_JSON) -> None:
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


def _clean_strings(text: str) -> str:
    """Raw control characters inside JSON strings: tab, newline and CR become spaces, the rest go.

    JSON forbids them unescaped (U+0000-U+001F), but vLLM's default guided decoding (xgrammar) lets
    them into length-bounded strings. Escaped ones are dealt with after decoding (``_without_non_text``).
    """
    if not any(ch < " " for ch in text):
        return text
    out = []
    for _, ch, in_string in _outside_strings(text):
        if in_string and ch < " ":
            if ch in "\t\n\r":
                out.append(" ")
            continue
        out.append(ch)
    return "".join(out)


def _without_non_text(value: Any) -> Any:
    """``value`` with every string (keys too) stripped of control characters that are not whitespace, and of U+FFFD.

    A model may write them escaped (``\\b``, ``\\u0007``), which JSON allows and vLLM's guidance
    backend lets through; they are no more text than raw ones, and would end up in a training set.
    U+FFFD stands for bytes the server could not decode (a byte-level token that is half a
    character): it carries no text, and it makes a string longer than the bound the grammar counted.
    """
    if isinstance(value, str):
        return _NOT_TEXT.sub("", value)
    if isinstance(value, dict):
        return {_without_non_text(k): _without_non_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_non_text(v) for v in value]
    return value


def _where(text: str, pos: int) -> str:
    """``line L, column C, near '...'`` for an error at ``pos`` of ``text``."""
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {column}, near {text[max(0, pos - 20) : pos + 20]!r}"


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
    body = _clean_strings(body)
    decoder = json.JSONDecoder()
    try:
        return _without_non_text(decoder.raw_decode(body, start)[0])
    except json.JSONDecodeError as first:
        try:
            return _without_non_text(decoder.raw_decode(_strip_trailing_commas(body), start)[0])
        except json.JSONDecodeError:
            pass
        depth, in_string = _scan(body, start)
        if truncated or depth > 0 or in_string:
            limit = " (the server hit max_tokens)" if truncated else ""
            raise ParseError(
                f"truncated JSON: output ended before the value was closed{limit}", reason=Reason.TRUNCATED_OUTPUT
            ) from None
        raise ParseError(f"invalid JSON: {first.msg} at {_where(body, first.pos)}") from None


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
        raise ParseError(
            f"output does not match the schema: {describe_validation_error(err)}", reason=Reason.SCHEMA_MISMATCH
        ) from None
