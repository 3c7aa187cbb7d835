"""Personalised QA (seed 003): images of one main character -> ``pers_qa``.

The main character is called by a tag (default ``<mam>``). Each row gets one question from the
bank in ``include/prompts/pers_qa/questions.j2``, chosen from the run seed and the row key, so a
rerun asks the same question. All of a row's images go into one prompt and the row gets exactly
one question with its answer, so questions and answers cannot be misaligned. The answer must start
with the tag; one that does not is repaired once and then goes to the errors file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from vqa_operators.exceptions import ConfigError, Reason, RowError
from vqa_operators.generators.answers import AFTER_TAG, PATTERN_MAX_CHARS, tagged_answer_model
from vqa_operators.generators.base import AnswerTextOptions, Generator, ImageRowOptions, OutputFields, derive_seed, origin_key
from vqa_operators.parsing import ParseError
from vqa_operators.prompts import PromptSet

CATEGORIES = ("appearance", "clothing", "accessories", "expression", "posture", "activity", "setting")
SUBJECT_TYPES = ("person", "pet", "object")
ANY = "any"


@dataclass(frozen=True)
class Question:
    """One entry of the question bank, already rendered with the tag."""

    category: str
    kinds: frozenset[str]
    text: str

    @property
    def id(self) -> str:
        """A stable short id of the question text (recorded in provenance)."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:10]

    def suits(self, subject: str | None) -> bool:
        """Whether the question fits a main character of this kind (None: kind unknown)."""
        return ANY in self.kinds or (subject is not None and subject in self.kinds)


def load_question_bank(prompts: PromptSet, tag: str) -> list[Question]:
    """Render the bank with ``tag`` and parse it; a malformed bank is a ConfigError."""
    bank: list[Question] = []
    for number, line in enumerate(prompts.render("questions", tag=tag).splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|", 2)]
        if len(parts) != 3:
            raise ConfigError(f"pers_qa question bank line {number}: expected 'category | kinds | question', got {line!r}")
        category, kinds_text, text = parts
        kinds = frozenset(k.strip() for k in kinds_text.split(","))
        if category not in CATEGORIES:
            raise ConfigError(f"pers_qa question bank line {number}: unknown category {category!r}; use one of {CATEGORIES}")
        if not kinds or not kinds <= {ANY, *SUBJECT_TYPES}:
            raise ConfigError(
                f"pers_qa question bank line {number}: kinds must be 'any' or from {SUBJECT_TYPES}, got {kinds_text!r}"
            )
        if tag not in text:
            raise ConfigError(f"pers_qa question bank line {number}: the question does not contain the tag {tag!r}")
        bank.append(Question(category, kinds, text))
    if not any(q.suits(None) for q in bank):
        raise ConfigError("pers_qa question bank has no question for 'any' main character")
    return bank


def choose_question(bank: list[Question], *, seed: int | None, key: str, subject: str | None) -> Question:
    """The row's question: a hash of (seed, row key) indexes the questions that suit the subject."""
    candidates = [q for q in bank if q.suits(subject)]
    index = derive_seed(seed or 0, f"{key}:pers_qa")
    assert index is not None  # a seed was given
    return candidates[index % len(candidates)]


def one_line(text: str) -> str:
    """Collapse whitespace runs (newlines included) to single spaces."""
    return " ".join(text.split())


class PersQAOptions(ImageRowOptions, AnswerTextOptions):
    """Options of the personalised QA generator."""

    tag: str = Field(
        "<mam>",
        min_length=1,
        max_length=40,
        pattern=r"^\S+$",
        title="Main character tag",
        description="Name the model must use for the main character; every answer starts with it.",
    )
    max_answer_chars: int = Field(
        PATTERN_MAX_CHARS,
        ge=50,
        le=PATTERN_MAX_CHARS,
        description=f"longest answer, tag included: the answer pattern's bound (at most {PATTERN_MAX_CHARS}, what vLLM's xgrammar compiles)",
    )
    output_key: str = Field("pers_qa", min_length=1, description="output field for 'Question: ... Answer: ...'")
    subject_key: str = Field(
        "subject_type",
        min_length=1,
        description="optional input field: person, pet or object (rows without it get questions that suit any)",
    )


class PersQAGenerator(Generator):
    """One question per row about the tagged main character, answered from all of the row's images."""

    name = "pers_qa"
    makes_dataset = True
    Options = PersQAOptions
    options: PersQAOptions

    @classmethod
    def output_fields(cls, options: PersQAOptions) -> OutputFields:
        """One "Question: ... Answer: ..." string in ``output_key``, about the images in ``image_key``."""
        return OutputFields(qa=options.output_key, form="text", images=options.image_key)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bank = load_question_bank(self.prompts, self.options.tag)
        opts = self.options
        self.answer_model = tagged_answer_model(opts.tag, opts.max_answer_chars)

    def _subject(self, row: dict[str, Any]) -> str | None:
        subject = row.get(self.options.subject_key)
        if subject is None:
            return None
        if subject not in SUBJECT_TYPES:
            raise RowError(Reason.BAD_FIELD, f"{self.options.subject_key!r} must be one of {SUBJECT_TYPES}, got {subject!r}")
        return subject

    def check_answer(self, answer: Any) -> None:
        """What the schema's pattern says: the answer starts with the tag, says something after it, and fits the bound."""
        tag, limit = self.options.tag, self.options.max_answer_chars
        text = answer.answer
        if not text.startswith(tag):
            raise ParseError(
                f"the answer must start with {tag!r}, but it starts with {text[:30]!r}", reason=Reason.ANSWER_MISSING_TAG
            )
        if not text[len(tag) :].strip(AFTER_TAG + " \t\n"):
            raise ParseError(f"the answer is only the tag {tag!r}; say something about {tag}", reason=Reason.ANSWER_MISSING_TAG)
        if len(text) > limit:
            raise ParseError(f"the answer has {len(text)} characters; the limit is {limit}", reason=Reason.SCHEMA_MISMATCH)

    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Ask the row's question about every image of ``row``; return ``pers_qa``."""
        opts = self.options
        paths = self.image_paths(row, opts.image_key, opts.max_images_per_row)
        subject = self._subject(row)
        key = origin_key(row)
        question = choose_question(self.bank, seed=self.seed, key=key, subject=subject)
        images = await self.media.prepare(paths)
        messages = [
            {"role": "system", "content": self.prompts.render("system", tag=opts.tag)},
            self.user_message(
                images,
                self.prompts.render("user", image_count=len(images), tag=opts.tag, subject=subject, question=question.text),
            ),
        ]
        answer = await self.ask(messages, self.answer_model, key=key, check=self.check_answer)
        text = f"Question: {one_line(question.text)} Answer: {one_line(answer.answer)}"  # type: ignore[attr-defined]
        meta = {"question_id": question.id, "question_category": question.category, "images": [img.summary() for img in images]}
        return {opts.output_key: text}, meta
