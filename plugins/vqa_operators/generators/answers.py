"""The JSON each model call must return: pydantic models whose JSON schemas vLLM's guided decoding accepts and enforces.

Every rule an answer must follow is one of three kinds:

1. **A JSON-schema keyword that vLLM's default backend accepts and enforces while decoding.**
   Measured with vLLM 0.32 (xgrammar 0.2.8 by default, llguidance 1.7 as its fallback) and checked
   by ``tests/generators/test_answer_schemas.py`` with both libraries' own compilers: ``type``,
   ``required``, ``additionalProperties: false``, ``enum``/``const``, ``minItems``/``maxItems``,
   ``anyOf``, ``$ref``, ``minLength``/``maxLength``, and ``pattern`` (a full match).
   Every free-text string has a ``maxLength`` (or a pattern with a bounded repetition), so that
   decoding closes it long before ``max_tokens``.
2. **Normalised after parsing, where the intent is unambiguous**: raw control characters in
   strings (xgrammar lets them into length-bounded strings; see ``parsing.py``), a label given
   twice, a question asked twice.
3. **Checked, with one repair request** (``Generator.ask``): rules no schema expresses, such as
   an expert role that is new.

Keywords vLLM refuses with HTTP 400 (``uniqueItems``, ``contains``) never appear. A string with
both a ``pattern`` and a length bound would make vLLM leave xgrammar for llguidance (and an
xgrammar-only server refuse it), so a pattern carries its own bound (``.{0,N}``) instead; and
since xgrammar 0.2.8 fails to compile a bounded repetition above 128 (an engine error, HTTP 500
for every such request), a patterned string is at most ``PATTERN_MAX_CHARS`` long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

STRICT = ConfigDict(extra="forbid", str_strip_whitespace=True)


class QAPair(BaseModel):
    """A question with its answer, both non-empty: what a stage reads back from a row (no length bound)."""

    model_config = STRICT
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


@dataclass(frozen=True)
class TextLimits:
    """The longest question and answer, in characters: the schema's ``maxLength``."""

    question: int
    answer: int


def bounded_text(max_chars: int) -> Any:
    """A non-empty free-text field of at most ``max_chars`` characters.

    vLLM enforces the maximum while decoding; it does not enforce the minimum (minLength), so an empty text
    fails validation here and goes to repair, then to the errors file as ``schema_mismatch``.
    """
    return Field(min_length=1, max_length=max_chars)


def qa_pair_model(limits: TextLimits, name: str = "QAPairOut") -> type[BaseModel]:
    """``{"question", "answer"}`` within ``limits``."""
    return create_model(
        name, __config__=STRICT, question=(str, bounded_text(limits.question)), answer=(str, bounded_text(limits.answer))
    )


def qa_set_model(name: str, max_pairs: int, limits: TextLimits, *, min_pairs: int = 1) -> type[BaseModel]:
    """``{"qa_pairs": [{"question", "answer"}]}`` with ``min_pairs``..``max_pairs`` pairs."""
    pair = qa_pair_model(limits)
    pairs = (list[pair], Field(min_length=min_pairs, max_length=max_pairs))  # type: ignore[valid-type]
    return create_model(name, __config__=ConfigDict(extra="forbid"), qa_pairs=pairs)


# what may stand between a tag and the rest of the sentence ("<mam>, who ..." / "<mam>'s jacket")
AFTER_TAG = " .,:;!?"
# the longest string a pattern may describe: xgrammar 0.2.8 cannot compile x{0,n} for n > 128
PATTERN_MAX_CHARS = 128


def tagged_answer_pattern(tag: str, max_chars: int) -> str:
    """A full-match regex: the tag, at most 3 of ``AFTER_TAG``, then something said, ``max_chars`` at most in all.

    It is the JSON schema's ``pattern``, which xgrammar enforces while decoding; the generator
    checks the same three things after parsing (``PersQAGenerator.check_answer``).
    """
    if max_chars > PATTERN_MAX_CHARS:
        raise ValueError(f"a patterned answer is at most {PATTERN_MAX_CHARS} characters, got {max_chars}")
    rest = max(1, max_chars - len(tag) - 4)
    after = re.escape(AFTER_TAG)
    return f"^{re.escape(tag)}[{after}]{{0,3}}[^\\s{after}].{{0,{rest}}}$"


def tagged_answer_model(tag: str, max_chars: int) -> type[BaseModel]:
    """``{"answer": "<tag> ..."}``: the pattern is the only constraint the schema states."""
    return create_model(
        "PersQAAnswer",
        __config__=STRICT,
        answer=(str, Field(json_schema_extra={"pattern": tagged_answer_pattern(tag, max_chars)})),
    )


def distinct(items: list[str]) -> list[str]:
    """``items`` without repeats, in first-seen order (a label given twice is one label)."""
    return list(dict.fromkeys(items))
