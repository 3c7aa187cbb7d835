"""What every generator shares: prompts, the ask-parse-repair step, and the bounded row runner.

A generator is plain Python: it knows nothing of Airflow, of files or of S3 output. It turns one
input row into the fields to add, or raises RowError with a reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vqa_operators.exceptions import ConfigError, RowError
from vqa_operators.generators.answers import TextLimits
from vqa_operators.media import DEFAULT_MAX_PIXELS, MediaReader, PreparedImage
from vqa_operators.parsing import ParseError, describe_validation_error, parse_structured
from vqa_operators.prompts import load_prompts
from vqa_operators.serving.base import ChatRequest, VLMServing
from vqa_operators.storage.jsonl import BadLine
from vqa_operators.storage.uris import Storage

M = TypeVar("M", bound=BaseModel)
RAW_OUTPUT_LIMIT = 2000


class GeneratorOptions(BaseModel):
    """Base of each generator's typed options; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_chars: int = Field(
        60_000, ge=1_000, le=2_000_000, description="a request whose text is longer goes to errors (prompt_too_long) unsent"
    )


class AnswerTextOptions(GeneratorOptions):
    """Options of generators whose model writes answers."""

    max_answer_chars: int = Field(
        600, ge=20, le=20_000, description="longest answer, in characters: the answer schema's bound, which guided decoding enforces"
    )


class QATextOptions(AnswerTextOptions):
    """Options of generators whose model writes questions and answers."""

    max_question_chars: int = Field(
        300, ge=20, le=5_000, description="longest question, in characters: the answer schema's bound, which guided decoding enforces"
    )

    @property
    def text_limits(self) -> TextLimits:
        """The bounds of a generated question and answer."""
        return TextLimits(question=self.max_question_chars, answer=self.max_answer_chars)


class ImageRowOptions(GeneratorOptions):
    """Options of generators whose rows hold image paths."""

    image_key: str = Field("image", min_length=1, description="input field with the image path(s)")
    max_images_per_row: int = Field(8, ge=1, le=64, description="rows with more images go to errors")


def row_key(row: dict[str, Any]) -> str:
    """A stable key for a row: the hash of its canonical JSON."""
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def derive_seed(seed: int | None, key: str) -> int | None:
    """A per-row seed from the run seed and the row key, so reruns sample the same way."""
    if seed is None:
        return None
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16)


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in chat messages (images not counted)."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text", "")) for part in content if part.get("type") == "text")
    return total


@dataclass
class Usage:
    """Token and request counts, summed over a run."""

    requests: int = 0
    repairs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class RowOutcome:
    """One input line's result: the fields to add, or the error that sends it to the errors file."""

    line: int
    row: dict[str, Any] | None
    fields: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: RowError | BadLine | None = None
    # the row's final record, {"out": row} or {"error": entry}, once the worker has made it ...
    record: dict[str, Any] | None = None
    # ... or when an earlier try had already made it
    reused: bool = False

    def error_entry(self, stage: str) -> dict[str, Any]:
        """The errors-file record: the input (row or raw line) with a reason."""
        err = self.error
        assert err is not None
        entry: dict[str, Any] = {"stage": stage, "line": self.line, "reason": err.reason, "detail": err.detail}
        if isinstance(err, BadLine):
            entry["raw_line"] = err.raw
        else:
            entry["row"] = self.row
            if err.raw_output is not None:
                entry["raw_output"] = err.raw_output[:RAW_OUTPUT_LIMIT]
        return entry


class Generator(ABC):
    """Base class: subclasses set ``name`` and ``Options`` and implement ``generate``."""

    name: ClassVar[str]
    Options: ClassVar[type[GeneratorOptions]] = GeneratorOptions
    # the folder under include/prompts/ (default: ``name``); stages of one task share a folder
    prompt_set: ClassVar[str | None] = None

    def __init__(
        self,
        serving: VLMServing,
        *,
        options: GeneratorOptions | dict[str, Any] | None = None,
        media: MediaReader | None = None,
        seed: int | None = None,
    ) -> None:
        self.serving = serving
        self.options = self.parse_options(options)
        self.media = media or MediaReader(Storage(), max_pixels=DEFAULT_MAX_PIXELS)
        self.seed = seed
        self.prompts = load_prompts(self.prompt_set or self.name)
        self.usage = Usage()

    @classmethod
    def parse_options(cls, options: GeneratorOptions | dict[str, Any] | None) -> GeneratorOptions:
        """The typed options; ConfigError names every bad or unknown key."""
        if isinstance(options, cls.Options):
            return options
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as err:
            raise ConfigError(f"bad {cls.name} options: {describe_validation_error(err)}") from None

    @abstractmethod
    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (fields to add to the row, provenance details) or raise RowError."""

    def answer_models(self) -> list[type[BaseModel]]:
        """Every answer model this generator asks for: their JSON schemas are all it sends (repairs included)."""
        return [self.answer_model]  # type: ignore[attr-defined]

    def finish_row(self, row: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        """The output row: the input row with the generated fields added (a stage may also drop fields)."""
        return {**row, **fields}

    def provenance(self) -> dict[str, Any]:
        """What produced this stage's output: model, prompt hash, sampling and options."""
        sampling = self.serving.sampling
        return {
            "model": self.serving.model_name,
            "prompt_sha256": self.prompts.sha256,
            "seed": self.seed,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "options": self.options.model_dump(),
        }

    @staticmethod
    def required(row: dict[str, Any], key: str) -> Any:
        """The row's ``key`` field; a missing or null one is a RowError (``missing_field``)."""
        value = row.get(key)
        if value is None:
            raise RowError("missing_field", f"the row has no {key!r} field" if key not in row else f"{key!r} is null")
        return value

    @classmethod
    def image_paths(cls, row: dict[str, Any], key: str, limit: int) -> list[str]:
        """The row's image paths: a string is a one-element list; anything else is a RowError."""
        value = cls.required(row, key)
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
            raise RowError("bad_field", f"{key!r} must be a path or a list of non-empty paths, got {type(value).__name__}")
        if not paths:
            raise RowError("bad_field", f"{key!r} is an empty list")
        if len(paths) > limit:
            raise RowError("bad_field", f"{key!r} has {len(paths)} images; the limit per row is {limit}")
        return paths

    @staticmethod
    def image_part(image: PreparedImage) -> dict[str, Any]:
        """One image as a message part: a base64 data URL."""
        return {"type": "image_url", "image_url": {"url": image.data_url}}

    @classmethod
    def user_message(cls, images: list[PreparedImage], text: str) -> dict[str, Any]:
        """One user turn: every image as a data URL part, in order, then the text."""
        parts = [cls.image_part(img) for img in images]
        parts.append({"type": "text", "text": text})
        return {"role": "user", "content": parts}

    async def ask(
        self,
        messages: list[dict[str, Any]],
        answer_model: type[M],
        *,
        key: str,
        check: Callable[[M], None] | None = None,
    ) -> M:
        """Ask for JSON matching ``answer_model`` (and passing ``check``); repair once, then raise RowError.

        ``check`` enforces rules a JSON schema cannot express (the answer starts with a tag, a role
        is new). It raises ParseError with a reason code, which names the row's failure if the
        repaired answer still breaks the rule.
        """
        chars = prompt_chars(messages)
        if chars > self.options.max_prompt_chars:
            raise RowError("prompt_too_long", f"the prompt has {chars} characters of text; the budget is {self.options.max_prompt_chars} (max_prompt_chars)")
        schema = answer_model.model_json_schema()
        name = answer_model.__name__
        seed = derive_seed(self.seed, key)

        def accept(text: str, finish_reason: str) -> M:
            answer = parse_structured(text, answer_model, truncated=finish_reason == "length")
            if check is not None:
                check(answer)
            return answer

        result = await self._chat(ChatRequest(messages=messages, schema=schema, schema_name=name, seed=seed))
        try:
            return accept(result.text, result.finish_reason)
        except ParseError as first:
            self.usage.repairs += 1
            repair = self.prompts.render("repair", error=str(first), schema=json.dumps(schema, ensure_ascii=False))
            follow_up = [*messages, {"role": "assistant", "content": result.text}, {"role": "user", "content": repair}]
            retry = await self._chat(ChatRequest(messages=follow_up, schema=schema, schema_name=name, seed=seed))
            try:
                return accept(retry.text, retry.finish_reason)
            except ParseError as second:
                raise RowError(second.reason, f"after one repair: {second}", raw_output=retry.text) from None

    async def _chat(self, request: ChatRequest) -> Any:
        result = await self.serving.chat(request)
        self.usage.requests += 1
        self.usage.prompt_tokens += result.prompt_tokens
        self.usage.completion_tokens += result.completion_tokens
        return result


async def run_rows(
    generator: Generator,
    items: Iterable[tuple[int, dict[str, Any] | BadLine | RowOutcome]],
    *,
    window: int,
    on_finished: Callable[[RowOutcome], None] | None = None,
    reorder: int | None = None,
) -> AsyncIterator[RowOutcome]:
    """Process rows with at most ``window`` running at once, yielding outcomes in input order.

    Rows that finish ahead of a slower one wait, finished, for it to be yielded: up to ``reorder``
    of them (default ``4 * window``), so that one slow row (a long answer, a repair) does not stop
    new rows from starting while the server has room. ``on_finished`` sees each new outcome as
    soon as its row finishes, in completion order, so that rows finished behind a slow one are not
    lost if the job fails. An item that is already a RowOutcome (a row finished by an earlier try)
    is passed through. Any other exception than RowError, from any row running, propagates at once
    and cancels the rest: the job fails as a whole (a down server is not a reason to fail rows).
    """
    loop = asyncio.get_running_loop()
    fatal: asyncio.Future[None] = loop.create_future()
    reorder = 4 * window if reorder is None else reorder
    running: set[asyncio.Task[RowOutcome]] = set()

    async def one(line: int, item: dict[str, Any] | BadLine | RowOutcome) -> RowOutcome:
        if isinstance(item, RowOutcome):
            return item
        try:
            if isinstance(item, BadLine):
                outcome = RowOutcome(line=line, row=None, error=item)
            else:
                try:
                    fields, meta = await generator.generate(item)
                    outcome = RowOutcome(line=line, row=item, fields=fields, meta=meta)
                except RowError as err:
                    outcome = RowOutcome(line=line, row=item, error=err)
            if on_finished is not None:
                on_finished(outcome)
        except BaseException as exc:
            if not fatal.done() and not isinstance(exc, asyncio.CancelledError):
                fatal.set_exception(exc)
            raise
        return outcome

    def start(line: int, item: dict[str, Any] | BadLine | RowOutcome) -> None:
        task = asyncio.ensure_future(one(line, item))
        running.add(task)
        task.add_done_callback(running.discard)
        pending.append(task)

    async def wait_for(tasks: set[asyncio.Task[RowOutcome]]) -> None:
        await asyncio.wait({*tasks, fatal}, return_when=asyncio.FIRST_COMPLETED)
        if fatal.done():
            fatal.result()  # raises the first job-level error; the finally below cancels the rest

    pending: deque[asyncio.Task[RowOutcome]] = deque()  # in input order: running, then finished and waiting
    try:
        for line, item in items:
            start(line, item)
            while True:
                while pending and pending[0].done():
                    yield pending.popleft().result()
                if len(running) < window and len(pending) - len(running) < reorder:
                    break
                # a running row must finish: the head (to make room to reorder) or any (to make room to run)
                await wait_for({pending[0]} if len(running) < window else set(running))
        while pending:
            await wait_for({pending[0]})
            yield pending.popleft().result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
