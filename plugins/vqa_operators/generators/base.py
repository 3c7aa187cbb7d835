"""What every generator shares: options, prompts and the ask-parse-repair step.

A generator is plain Python: it knows nothing of Airflow, of files or of S3 output. It turns one
input row into the fields to add, or raises RowError with a reason.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError, Reason, RowError
from vqa_operators.generators.answers import TextLimits
from vqa_operators.media import MediaReader, PreparedImage
from vqa_operators.parsing import ParseError, describe_validation_error, parse_structured
from vqa_operators.prompts import load_prompts
from vqa_operators.records import PairRejection
from vqa_operators.serving.base import ChatRequest, VLMServing
from vqa_operators.storage.uris import Storage

M = TypeVar("M", bound=BaseModel)
# the output rows' field that says, per stage, what produced them (Generator.provenance and the row's details)
PROVENANCE_KEY = "vqa_provenance"
# a video clip's field with its frames' paths (the seeds' name)
CLIP_FRAMES = "Frames_Images"
# a video stage's provenance details: the frames it sent the model (each with its path), and how many the video had
FRAMES_SENT = "frames_sent"
FRAMES_TOTAL = "frames_total"


class GeneratorOptions(BaseModel):
    """Base of each generator's typed options; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_chars: int = Field(
        60_000, ge=1_000, le=2_000_000, description="a request whose text is longer goes to errors (prompt_too_long) unsent"
    )


class AnswerTextOptions(GeneratorOptions):
    """Options of generators whose model writes answers."""

    max_answer_chars: int = Field(
        600,
        ge=20,
        le=20_000,
        description="longest answer, in characters: the answer schema's bound, which guided decoding enforces",
    )


class QATextOptions(AnswerTextOptions):
    """Options of generators whose model writes questions and answers."""

    max_question_chars: int = Field(
        300,
        ge=20,
        le=5_000,
        description="longest question, in characters: the answer schema's bound, which guided decoding enforces",
    )

    @property
    def text_limits(self) -> TextLimits:
        """The bounds of a generated question and answer."""
        return TextLimits(question=self.max_question_chars, answer=self.max_answer_chars)


class ImageLimitOptions(GeneratorOptions):
    """Options of generators that send a row's images."""

    max_images_per_row: int = Field(settings.MAX_IMAGES_PER_ROW, ge=1, le=64, description="rows with more images go to errors")


class ImageRowOptions(ImageLimitOptions):
    """Options of generators whose rows hold image paths."""

    image_key: str = Field("image", min_length=1, description="input field with the image path(s)")


class FrameOptions(GeneratorOptions):
    """Options of generators that send a video's frames."""

    max_frames: int = Field(
        settings.MAX_FRAMES, ge=1, le=256, title="Frames per request", description="Sampled evenly across the video's clips."
    )
    frame_max_pixels: int = Field(settings.FRAME_MAX_PIXELS, ge=28 * 28, le=4_000_000, description="pixel budget per frame")


def row_key(row: dict[str, Any]) -> str:
    """A stable key for a row: the hash of its canonical JSON."""
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def origin_key(row: dict[str, Any]) -> str:
    """The row's identity across the stages of a run and across runs: the key of the row as the run's input gave it.

    The first stage's provenance records it; a row with none is the input row itself. A later
    stage's row holds what earlier stages wrote, and some of that names the run (the video ingest's
    frames lie in the run's folder), so its content hash would differ from run to run: per-row
    seeds come from this key instead, so that a rerun of the same input samples the same way.
    """
    for details in (row.get(PROVENANCE_KEY) or {}).values():
        if isinstance(details, dict) and isinstance(details.get("row_key"), str):
            return details["row_key"]
    return row_key(row)


def input_line(row: dict[str, Any] | None, line: int) -> int:
    """The row's line in the run's input: the first stage's provenance says it (a later stage reads a staged file), else ``line``."""
    for details in ((row or {}).get(PROVENANCE_KEY) or {}).values():
        if isinstance(details, dict) and isinstance(details.get("line"), int):
            return details["line"]
    return line


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


@dataclass(frozen=True)
class QAItem:
    """One QA pair of a row, whatever its form: its position, its text, and the element as the row holds it."""

    index: int
    question: str
    answer: str
    raw: Any
    labels: list[str] = field(default_factory=list)
    # the clips the pair is about, as indices into the row's clips (from 0); empty where the form names none
    clips: list[int] = field(default_factory=list)


def split_pair_text(text: str) -> tuple[str, str]:
    """``"Question: ... Answer: ..."`` -> (question, answer); text without " Answer: " is all answer."""
    question, sep, answer = text.partition(" Answer: ")
    return (question.removeprefix("Question: "), answer) if sep else ("", text)


def path_list(value: Any) -> list[str]:
    """A row field that holds one path or a list of them, as a list (what is not a string left out)."""
    if isinstance(value, str):
        return [value]
    return [p for p in value if isinstance(p, str)] if isinstance(value, list) else []


@dataclass(frozen=True)
class OutputFields:
    """Where a generator's output rows keep what a reader looks at: the QA, and the media it is about."""

    # the field with the generated QA, and its form: a list of {"question", "answer"} ("pairs"),
    # one "Question: ... Answer: ..." string ("text"), or a list of {"Label", "Question", "Answer"} ("labelled")
    qa: str
    form: Literal["pairs", "text", "labelled"]
    # the field with the row's image path(s), or with its clips (each with its frames in ``CLIP_FRAMES``) and the video's meta text
    images: str | None = None
    clips: str | None = None
    meta: str | None = None
    # video: the stage whose provenance lists the frames the model was shown (``FRAMES_SENT``, ``FRAMES_TOTAL``)
    sent: str | None = None
    # labelled pairs: how a pair's labels are written in its "Label" string (one label if None)
    label_separator: str | None = None
    # labelled pairs: the pair's key naming the clips it is about (indices into the row's clips), if it has one
    pair_clips: str | None = None

    def pairs(self, row: dict[str, Any]) -> list[QAItem]:
        """The row's QA pairs, in order; elements that are not pairs of this form are skipped."""
        value = row.get(self.qa)
        if self.form == "text":
            return [QAItem(0, *split_pair_text(value), raw=value)] if isinstance(value, str) else []
        if not isinstance(value, list):
            return []
        question, answer = ("Question", "Answer") if self.form == "labelled" else ("question", "answer")
        items = []
        for index, element in enumerate(value):
            if isinstance(element, dict) and isinstance(element.get(question), str) and isinstance(element.get(answer), str):
                clips = element.get(self.pair_clips) if self.pair_clips else None
                items.append(
                    QAItem(
                        index,
                        element[question],
                        element[answer],
                        raw=element,
                        labels=self.labels(element.get("Label")),
                        clips=[c for c in clips if isinstance(c, int) and not isinstance(c, bool)]
                        if isinstance(clips, list)
                        else [],
                    )
                )
        return items

    def labels(self, label: Any) -> list[str]:
        """A pair's labels, as its ``Label`` is written: one string, joined by ``label_separator``, or a list."""
        if isinstance(label, list):
            return [x for x in label if isinstance(x, str) and x]
        if not isinstance(label, str) or not label:
            return []
        parts = label.split(self.label_separator) if self.label_separator else [label]
        return [part.strip() for part in parts if part.strip()]

    def span(self, row: dict[str, Any], item: QAItem) -> tuple[float, float] | None:
        """The seconds of the video a pair is about: from the first named clip's ``Start`` to the last one's ``End``, if the clips say."""
        clips = row.get(self.clips) if self.clips else None
        if not item.clips or not isinstance(clips, list):
            return None
        named = [clips[i] for i in item.clips if 0 <= i < len(clips) and isinstance(clips[i], dict)]
        starts = [c.get("Start") for c in named]
        ends = [c.get("End") for c in named]
        if not named or not all(isinstance(x, int | float) for x in starts + ends):
            return None
        return float(min(starts)), float(max(ends))

    def frames_shown(self, row: dict[str, Any]) -> tuple[list[str], int | None]:
        """A video row's frames as the model was shown them (else every clip's frames), and how many frames the video had (None: unknown)."""
        details = ((row.get(PROVENANCE_KEY) or {}).get(self.sent) or {}) if self.sent else {}
        sent = details.get(FRAMES_SENT) if isinstance(details, dict) else None
        frames = (
            [f["path"] for f in sent if isinstance(f, dict) and isinstance(f.get("path"), str)] if isinstance(sent, list) else []
        )
        clips = row.get(self.clips) if self.clips else None
        if not frames and isinstance(clips, list):
            frames = [path for clip in clips if isinstance(clip, dict) for path in path_list(clip.get(CLIP_FRAMES))]
        total = details.get(FRAMES_TOTAL) if isinstance(details, dict) else None
        return frames, total if isinstance(total, int) else None

    def title(self, row: dict[str, Any]) -> str:
        """What names the row to a reader: its ``id``, else its meta text."""
        return str(row.get("id") or (row.get(self.meta) if self.meta else None) or "")

    def keep(self, row: dict[str, Any], indices: Iterable[int]) -> dict[str, Any]:
        """``row`` with only the pairs at ``indices`` (a text-form row holds one pair: keep it, or nothing is left)."""
        keep = set(indices)
        value = row.get(self.qa)
        if self.form == "text":
            return dict(row) if 0 in keep else {k: v for k, v in row.items() if k != self.qa}
        return {**row, self.qa: [element for index, element in enumerate(value or []) if index in keep]}


@dataclass
class Generated:
    """What a stage made of one row: the fields to add and the provenance details.

    A quality gate also says which pairs it rejected (``records.PairRejection``) and how many it
    kept: a row with none left leaves the dataset.
    """

    fields: dict[str, Any]
    meta: dict[str, Any]
    rejected: list[PairRejection] = field(default_factory=list)
    # pairs the gate kept (None: a generation stage, which does not judge pairs)
    pairs_kept: int | None = None

    @property
    def kept(self) -> bool:
        """Whether the row stays in the dataset: a generation stage's always does, a gate's if it kept a pair."""
        return self.pairs_kept is None or self.pairs_kept > 0


@dataclass
class Usage:
    """Token and request counts, summed over a run."""

    requests: int = 0
    repairs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generator(ABC):
    """Base class: subclasses set ``name`` and ``Options`` and implement ``generate``."""

    name: ClassVar[str]
    Options: ClassVar[type[GeneratorOptions]] = GeneratorOptions
    # the folder under include/prompts/ (default: ``name``); stages of one task share a folder
    prompt_set: ClassVar[str | None] = None
    # a quality gate drops pairs (``run_row`` says which, and why); a generation stage adds fields
    gate: ClassVar[bool] = False
    # its rows are a dataset's, the QA pairs a reader trains on (the last generation stage): a gate can judge them
    makes_dataset: ClassVar[bool] = False
    # the completion tokens its answers need, unless a run sets max_tokens
    max_tokens: ClassVar[int] = settings.MAX_TOKENS

    def __init__(
        self,
        serving: VLMServing,
        *,
        options: GeneratorOptions | dict[str, Any] | None = None,
        media: MediaReader | None = None,
        seed: int | None = None,
        output: str | None = None,
    ) -> None:
        self.serving = serving
        # where the run writes its rows (None outside a worker run): a stage that writes media keeps it beside them
        self.output = output
        self.options = self.parse_options(options)
        self.media = media or MediaReader(Storage(), max_pixels=settings.MAX_PIXELS)
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

    async def run_row(self, row: dict[str, Any]) -> Generated:
        """What the run loop calls for each row: ``generate``'s result (a quality gate adds its rejections)."""
        fields, meta = await self.generate(row)
        return Generated(fields, meta)

    async def aclose(self) -> None:  # noqa: B027 - a hook: most generators open nothing else
        """Release what the generator opened besides its model server (the run loop calls this once, last)."""

    @classmethod
    def judged_source(cls, options: Any) -> str | None:
        """For a quality gate, the generator whose rows it judges (its rows keep that generator's fields); else None."""
        return None

    def answer_models(self) -> list[type[BaseModel]]:
        """Every answer model this generator asks for: their JSON schemas are all it sends (repairs included)."""
        return [self.answer_model]  # type: ignore[attr-defined]

    @classmethod
    @abstractmethod
    def output_fields(cls, options: Any) -> OutputFields:
        """Where rows made with ``options`` (this generator's parsed Options) keep their QA and media."""

    def finish_row(self, row: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        """The output row: the input row with the generated fields added (a stage may also drop fields)."""
        return {**row, **fields}

    def provenance(self) -> dict[str, Any]:
        """What produced this stage's output: model, prompt hash, sampling and options."""
        sampling = self.serving.sampling
        return {
            "model": self.serving.model,
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
            raise RowError(Reason.MISSING_FIELD, f"the row has no {key!r} field" if key not in row else f"{key!r} is null")
        return value

    @classmethod
    def image_paths(cls, row: dict[str, Any], key: str, limit: int) -> list[str]:
        """The row's image paths: a string is a one-element list; anything else is a RowError."""
        value = cls.required(row, key)
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
            raise RowError(Reason.BAD_FIELD, f"{key!r} must be a path or a list of non-empty paths, got {type(value).__name__}")
        if not paths:
            raise RowError(Reason.BAD_FIELD, f"{key!r} is an empty list")
        if len(paths) > limit:
            raise RowError(Reason.BAD_FIELD, f"{key!r} has {len(paths)} images; the limit per row is {limit}")
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
            raise RowError(
                Reason.PROMPT_TOO_LONG,
                f"the prompt has {chars} characters of text; the budget is {self.options.max_prompt_chars} (max_prompt_chars)",
            )
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
