"""Multi-role video QA (seed 000) in three stages that can run as three tasks, with JSONL between them.

Input rows have ``Meta`` (text about the video) and ``Clips`` (in order, each with
``Description``, ``Audio_Text`` and ``Frames_Images``). The stages carry their state in row fields:

- ``QA`` (``output_key``): the current QA set. After ``video_qa_initial`` and
  ``video_qa_multiagent`` it is a list of ``{"Question", "Answer"}``; after ``video_qa_final`` it is
  the seed's output, a list of ``{"Label", "Question", "Answer"}``.
- ``video_qa_state`` (``state_key``): ``{"experts": [{"role", "description", "subtask",
  "iteration"}], "iterations": int, "terminated": bool, "stop_reason": str | null}``. The final
  stage removes it from the row and records it in provenance.

Frames are sampled evenly across the whole video up to ``max_frames`` per request; the initial and
expert requests show them, interleaved with each clip's text. The master's requests (recruit,
revise) and the final synthesis are text-only: video information, clip texts and the QA set.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, create_model, field_validator

from vqa_operators.exceptions import Reason, RowError
from vqa_operators.generators.answers import STRICT, QAPair, TextLimits, bounded_text, distinct, qa_set_model
from vqa_operators.generators.base import (
    CLIP_FRAMES,
    FRAMES_SENT,
    FRAMES_TOTAL,
    FrameOptions,
    Generator,
    OutputFields,
    QATextOptions,
    origin_key,
)
from vqa_operators.media import PreparedImage
from vqa_operators.parsing import ParseError, describe_validation_error

# The final stage's label set: identifier -> what it covers (also in the README).
LABELS: dict[str, str] = {
    "visual_understanding": "what is shown: objects, people, scenes, text on screen, actions and visual style",
    "emotion_recognition": "the emotions people show and the mood or feeling the video evokes",
    "theme_and_brand": "the message or theme, and the product or brand and how it is presented",
    "persuasion_strategy": "how the video tries to convince: appeals, claims, storytelling, calls to action",
    "audience_and_engagement": "who the video is for and how it holds attention or invites a response",
}
LabelId = Literal[tuple(LABELS)]  # type: ignore[valid-type]
LABEL_SEPARATOR = ", "
# a final pair's key naming the clips it is about: indices into the row's clips, from 0
PAIR_CLIPS = "Clips"
# why the multi-agent stage stopped: it used up max_iterations, the master said the set is complete,
# or the master kept naming an expert it already had (even after a repair request)
StopReason = Literal["max_iterations", "master_terminated", "duplicate_expert"]


# --- input rows -----------------------------------------------------------------------------


class Clip(BaseModel):
    """One clip of the input, in the seed's field names."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, str_strip_whitespace=True)
    description: str = Field(alias="Description")
    audio_text: str | None = Field(None, alias="Audio_Text")
    frames: list[str] = Field(alias=CLIP_FRAMES)

    @field_validator("frames")
    @classmethod
    def _paths(cls, frames: list[str]) -> list[str]:
        if any(not p.strip() for p in frames):
            raise ValueError("frame paths must be non-empty")
        return frames


@dataclass(frozen=True)
class Frame:
    """A sampled frame: its clip (0-based), its index in the clip and its path."""

    clip: int
    index: int
    path: str

    def summary(self) -> dict[str, Any]:
        return {"clip": self.clip, "frame": self.index, "path": self.path}


@dataclass(frozen=True)
class Video:
    """A validated input row: meta text, clips and the frames chosen for the prompt."""

    meta: str
    clips: list[Clip]
    frames: list[Frame]

    @property
    def frames_total(self) -> int:
        return sum(len(c.frames) for c in self.clips)


def sample_frames(clips: list[Clip], budget: int) -> list[Frame]:
    """At most ``budget`` frames, evenly spaced over the whole video (the middle of equal spans), in order."""
    every = [Frame(ci, fi, path) for ci, clip in enumerate(clips) for fi, path in enumerate(clip.frames)]
    n = len(every)
    if n <= budget:
        return every
    return [every[int((i + 0.5) * n / budget)] for i in range(budget)]


# --- state carried between stages ------------------------------------------------------------


class Expert(BaseModel):
    """An expert the master recruits."""

    model_config = STRICT
    role: str = bounded_text(80)
    description: str = bounded_text(500)
    subtask: str = bounded_text(500)


class ExpertRecord(Expert):
    """An expert in the carried state, with the iteration that recruited it."""

    iteration: int = Field(ge=1)


class VideoQAState(BaseModel):
    """``video_qa_state``: what the multi-agent stage has done so far."""

    model_config = ConfigDict(extra="forbid")
    experts: list[ExpertRecord] = Field(default_factory=list)
    iterations: int = Field(0, ge=0)
    terminated: bool = False
    stop_reason: StopReason | None = None


# --- model answers ---------------------------------------------------------------------------


class Recruit(BaseModel):
    """The master recruits one new expert."""

    model_config = STRICT
    action: Literal["recruit"]
    reason: str = bounded_text(300)
    expert: Expert


class Terminate(BaseModel):
    """The master says the set is complete."""

    model_config = STRICT
    action: Literal["terminate"]
    reason: str = bounded_text(300)


class MasterDecision(RootModel[Recruit | Terminate]):
    """The master's move in one iteration. A union, so the grammar itself makes "recruit" carry an expert."""


def labelled_pair_model(limits: TextLimits, clips: int | None = None) -> type[BaseModel]:
    """One final pair: one or two labels from ``LABELS`` (a label given twice counts once), a question and an answer.

    With ``clips``, also the numbers of the clips the pair is about, which the schema bounds to
    1..``clips`` (guided decoding keeps them within the row's clips); a number given twice counts once.
    """

    def _distinct(cls: Any, labels: list[str]) -> list[str]:
        return distinct(labels)

    def _ordered(cls: Any, numbers: list[int]) -> list[int]:
        return sorted(set(numbers))

    fields: dict[str, Any] = {
        "labels": (list[LabelId], Field(min_length=1, max_length=2)),  # type: ignore[valid-type]
        "question": (str, bounded_text(limits.question)),
        "answer": (str, bounded_text(limits.answer)),
    }
    validators: dict[str, Any] = {"_distinct": field_validator("labels")(_distinct)}
    if clips:
        fields["clips"] = (list[Annotated[int, Field(ge=1, le=clips)]], Field(min_length=1, max_length=clips))
        validators["_ordered"] = field_validator("clips")(_ordered)
    return create_model("LabelledPair", __config__=STRICT, __validators__=validators, **fields)


@functools.lru_cache(maxsize=256)
def final_model(pairs: int, limits: TextLimits, clips: int | None = None) -> type[BaseModel]:
    """``{"qa": [{"labels", "question", "answer"[, "clips"]}]}`` with exactly ``pairs`` pairs; ``clips``: the row's clip count."""
    pair = labelled_pair_model(limits, clips)
    qa = (list[pair], Field(min_length=pairs, max_length=pairs))  # type: ignore[valid-type]
    return create_model("VideoQAFinal", __config__=ConfigDict(extra="forbid"), qa=qa)


# --- helpers ---------------------------------------------------------------------------------

_NOT_WORD = re.compile(r"[\W_]+")


def comparable(text: str) -> str:
    """Case-, punctuation- and spacing-insensitive form of a question or role, for duplicate checks."""
    return " ".join(_NOT_WORD.sub(" ", text.casefold()).split())


def dedupe(pairs: list[dict[str, Any]], key: str = "Question") -> list[dict[str, Any]]:
    """Drop pairs whose question repeats an earlier one (ignoring case, punctuation and spacing)."""
    seen: set[str] = set()
    out = []
    for pair in pairs:
        norm = comparable(pair[key])
        if norm not in seen:
            seen.add(norm)
            out.append(pair)
    return out


def to_rows(pairs: list[Any]) -> list[dict[str, str]]:
    """Model pairs in the rows' spelling: ``{"Question", "Answer"}``."""
    return [{"Question": p.question, "Answer": p.answer} for p in pairs]


def qa_json(pairs: list[dict[str, Any]]) -> str:
    """A QA set as it appears in prompts: JSON, one pair per line."""
    return (
        "[\n"
        + ",\n".join(json.dumps({"question": p["Question"], "answer": p["Answer"]}, ensure_ascii=False) for p in pairs)
        + "\n]"
    )


class VideoQAOptions(QATextOptions, FrameOptions):
    """Options every video QA stage shares."""

    meta_key: str = Field("Meta", min_length=1, description="input field with the video's meta text")
    clips_key: str = Field("Clips", min_length=1, description="input field with the list of clips")
    output_key: str = Field("QA", min_length=1, description="field with the current QA set, and the final output")
    state_key: str = Field("video_qa_state", min_length=1, description="field with the state carried between stages")
    max_clips: int = Field(128, ge=1, le=4096, description="rows with more clips go to errors")


class _VideoQAStage(Generator):
    """What the three stages share: reading the row, frames, prompt parts and the carried state."""

    prompt_set = "video_qa"
    # the revised and final sets are long JSON answers
    max_tokens = 4096
    options: VideoQAOptions

    def read_video(self, row: dict[str, Any]) -> Video:
        """Validate ``Meta`` and ``Clips``; a RowError names the problem."""
        opts = self.options
        meta = self.required(row, opts.meta_key)
        raw = self.required(row, opts.clips_key)
        if isinstance(meta, dict):
            meta = json.dumps(meta, ensure_ascii=False)
        if not isinstance(meta, str):
            raise RowError(Reason.BAD_FIELD, f"{opts.meta_key!r} must be text (or an object), got {type(meta).__name__}")
        if not isinstance(raw, list) or not raw:
            raise RowError(Reason.BAD_FIELD, f"{opts.clips_key!r} must be a non-empty list of clips")
        if len(raw) > opts.max_clips:
            raise RowError(Reason.BAD_FIELD, f"{opts.clips_key!r} has {len(raw)} clips; the limit is {opts.max_clips}")
        clips = []
        for number, item in enumerate(raw, start=1):
            if not isinstance(item, dict):
                raise RowError(Reason.BAD_FIELD, f"clip {number} must be an object, got {type(item).__name__}")
            try:
                clips.append(Clip.model_validate(item))
            except ValidationError as err:
                raise RowError(Reason.BAD_FIELD, f"clip {number}: {describe_validation_error(err)}") from None
        video = Video(meta=meta.strip(), clips=clips, frames=sample_frames(clips, opts.max_frames))
        if not video.frames:
            raise RowError(Reason.BAD_FIELD, f"no clip has any frame in {CLIP_FRAMES!r}")
        return video

    async def load_frames(self, video: Video) -> list[PreparedImage]:
        """The sampled frames, prepared within the per-frame pixel budget."""
        return await self.media.prepare([f.path for f in video.frames], max_pixels=self.options.frame_max_pixels)

    def video_parts(self, video: Video, images: list[PreparedImage] | None) -> list[dict[str, Any]]:
        """The video as message parts: meta, then each clip's text followed by its frames (if given)."""
        shown: dict[int, list[PreparedImage]] = {}
        if images is not None:
            for frame, image in zip(video.frames, images, strict=True):
                shown.setdefault(frame.clip, []).append(image)
        parts: list[dict[str, Any]] = [
            {
                "type": "text",
                "text": self.prompts.render(
                    "video",
                    meta=video.meta,
                    clip_count=len(video.clips),
                    frames_sent=len(images or []),
                    frames_total=video.frames_total,
                ),
            }
        ]
        for number, clip in enumerate(video.clips, start=1):
            frames = shown.get(number - 1, [])
            text = self.prompts.render(
                "clip",
                number=number,
                total=len(video.clips),
                description=clip.description,
                audio=clip.audio_text,
                shown=len(frames),
                frames=len(clip.frames),
            )
            parts.append({"type": "text", "text": text})
            parts.extend(self.image_part(img) for img in frames)
        return parts

    def messages(
        self, video: Video, images: list[PreparedImage] | None, task: str, *, system: str | None = None
    ) -> list[dict[str, Any]]:
        """System turn plus one user turn: the video parts, then the task text."""
        content = [*self.video_parts(video, images), {"type": "text", "text": task}]
        return [{"role": "system", "content": system or self.prompts.render("system")}, {"role": "user", "content": content}]

    @classmethod
    def output_fields(cls, options: VideoQAOptions) -> OutputFields:
        """The QA set in ``output_key`` ({"Question", "Answer"}, labelled after the final stage), about the clips' frames."""
        return OutputFields(
            qa=options.output_key,
            form="labelled",
            clips=options.clips_key,
            meta=options.meta_key,
            label_separator=LABEL_SEPARATOR,
            pair_clips=PAIR_CLIPS,
            sent=VideoQAInitialGenerator.name,
        )

    def current_set(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The QA set an earlier stage left in ``output_key``."""
        key = self.options.output_key
        value = row.get(key)
        if value is None:
            raise RowError(Reason.MISSING_FIELD, f"the row has no {key!r} QA set; run video_qa_initial on it first")
        try:
            pairs = [QAPair.model_validate({"question": p.get("Question"), "answer": p.get("Answer")}) for p in value]
        except (AttributeError, TypeError, ValidationError):
            raise RowError(
                Reason.BAD_FIELD, f"{key!r} must be a list of {{'Question', 'Answer'}} objects with non-empty text"
            ) from None
        if not pairs:
            raise RowError(Reason.BAD_FIELD, f"{key!r} is an empty QA set")
        return to_rows(pairs)

    def read_state(self, row: dict[str, Any]) -> VideoQAState:
        """The carried ``video_qa_state`` (a fresh one if the row has none)."""
        value = row.get(self.options.state_key)
        if value is None:
            return VideoQAState()
        try:
            return VideoQAState.model_validate(value)
        except ValidationError as err:
            raise RowError(Reason.BAD_FIELD, f"{self.options.state_key!r}: {describe_validation_error(err)}") from None

    @staticmethod
    def frames_meta(video: Video) -> dict[str, Any]:
        return {FRAMES_SENT: [f.summary() for f in video.frames], FRAMES_TOTAL: video.frames_total}


# --- stage 1 ---------------------------------------------------------------------------------


class VideoQAInitialOptions(VideoQAOptions):
    initial_pairs: int = Field(10, ge=1, le=50, description="at most this many QA pairs from the initial pass")


class VideoQAInitialGenerator(_VideoQAStage):
    """Stage 1: every clip (text and sampled frames) and the meta -> up to ``initial_pairs`` QA pairs."""

    name = "video_qa_initial"
    Options = VideoQAInitialOptions
    options: VideoQAInitialOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answer_model = qa_set_model("VideoQASet", self.options.initial_pairs, self.options.text_limits)

    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        opts = self.options
        video = self.read_video(row)
        images = await self.load_frames(video)
        task = self.prompts.render("initial", pairs=opts.initial_pairs)
        answer = await self.ask(self.messages(video, images, task), self.answer_model, key=origin_key(row))
        pairs = to_rows(answer.qa_pairs)  # type: ignore[attr-defined]
        unique = dedupe(pairs)
        fields = {opts.output_key: unique, opts.state_key: VideoQAState().model_dump()}
        return fields, {**self.frames_meta(video), "duplicates_dropped": len(pairs) - len(unique)}


# --- stage 2 ---------------------------------------------------------------------------------


class VideoQAMultiAgentOptions(VideoQAOptions):
    max_iterations: int = Field(
        3,
        ge=0,
        le=20,
        title="Expert rounds",
        description="Multi-agent recruit-answer-revise rounds in all (the state counts them); the master may stop earlier.",
    )
    expert_pairs: int = Field(5, ge=1, le=30, description="at most this many new pairs per expert")
    max_pairs: int = Field(20, ge=1, le=100, description="the revised set is kept to at most this many pairs")


class VideoQAMultiAgentGenerator(_VideoQAStage):
    """Stage 2: per iteration, the master recruits a new expert (or stops), the expert adds pairs, the master revises.

    The carried set is the revised set (at most ``max_pairs``), never a growing concatenation.
    ``max_iterations`` counts iterations across runs, so rerunning the stage on its own output
    does no more work.
    """

    name = "video_qa_multiagent"
    Options = VideoQAMultiAgentOptions
    options: VideoQAMultiAgentOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.options.text_limits
        self.expert_model = qa_set_model("ExpertQASet", self.options.expert_pairs, limits)
        self.revised_model = qa_set_model("RevisedQASet", self.options.max_pairs, limits)

    def answer_models(self) -> list[type[BaseModel]]:
        """The master's decision, the expert's pairs and the revised set."""
        return [MasterDecision, self.expert_model, self.revised_model]

    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        opts = self.options
        video = self.read_video(row)
        current = self.current_set(row)
        state = self.read_state(row)
        key = origin_key(row)
        images: list[PreparedImage] | None = None
        # the frames are prepared while the master decides, not after: they are off the critical path
        frames: asyncio.Task[list[PreparedImage]] | None = None
        ran = 0
        try:
            while not state.terminated and state.iterations < opts.max_iterations:
                iteration = state.iterations + 1
                frames = frames or asyncio.ensure_future(self.load_frames(video))
                decision = await self._recruit(video, current, state, iteration, key)
                if not isinstance(decision, Recruit):
                    state.terminated = True
                    state.stop_reason = "duplicate_expert" if decision is None else "master_terminated"
                    break
                expert = decision.expert
                images = await frames
                task = self.prompts.render("expert", subtask=expert.subtask, current_qa=qa_json(current), pairs=opts.expert_pairs)
                system = self.prompts.render("expert_system", role=expert.role, description=expert.description)
                added = await self.ask(
                    self.messages(video, images, task, system=system), self.expert_model, key=f"{key}:expert:{iteration}"
                )
                expert_rows = to_rows(added.qa_pairs)  # type: ignore[attr-defined]
                current = await self.revise(
                    video, current=current, expert_pairs=expert_rows, role=expert.role, key=f"{key}:revise:{iteration}"
                )
                state.experts.append(ExpertRecord(**expert.model_dump(), iteration=iteration))
                state.iterations = iteration
                ran += 1
        finally:
            if frames is not None and images is None:  # never needed (the master stopped) or the row failed first
                frames.cancel()
                await asyncio.gather(frames, return_exceptions=True)
        if not state.terminated and state.iterations >= opts.max_iterations:
            state.stop_reason = "max_iterations"
        fields = {opts.output_key: current, opts.state_key: state.model_dump()}
        meta = {"iterations_run": ran, **(self.frames_meta(video) if images is not None else {})}
        return fields, meta

    async def _recruit(
        self, video: Video, current: list[dict[str, str]], state: VideoQAState, iteration: int, key: str
    ) -> Recruit | Terminate | None:
        """The master's decision, or None if it kept naming an expert it already had."""
        taken = {comparable(e.role) for e in state.experts}

        def check(decision: MasterDecision) -> None:
            move = decision.root
            if isinstance(move, Recruit) and comparable(move.expert.role) in taken:
                raise ParseError(
                    f"the role {move.expert.role!r} was already recruited; name a different expert or terminate",
                    reason=Reason.DUPLICATE_EXPERT,
                )

        task = self.prompts.render(
            "recruit",
            iteration=iteration,
            max_iterations=self.options.max_iterations,
            current_qa=qa_json(current),
            current_count=len(current),
            experts=state.experts,
        )
        try:
            decision = await self.ask(
                self.messages(video, None, task), MasterDecision, key=f"{key}:recruit:{iteration}", check=check
            )
        except RowError as err:
            if err.reason == Reason.DUPLICATE_EXPERT:
                return None
            raise
        return decision.root

    async def revise(
        self, video: Video, *, current: list[dict[str, str]], expert_pairs: list[dict[str, str]], role: str, key: str
    ) -> list[dict[str, str]]:
        """The master merges the expert's pairs into the current set; the result replaces it."""
        opts = self.options
        task = self.prompts.render(
            "revise",
            current_qa=qa_json(current),
            current_count=len(current),
            expert_qa=qa_json(expert_pairs),
            expert_count=len(expert_pairs),
            role=role,
            max_pairs=opts.max_pairs,
        )
        revised = await self.ask(self.messages(video, None, task), self.revised_model, key=key)
        return dedupe(to_rows(revised.qa_pairs))  # type: ignore[attr-defined]


# --- stage 3 ---------------------------------------------------------------------------------


class VideoQAFinalOptions(VideoQAOptions):
    final_pairs: int = Field(
        10, ge=1, le=50, title="Final QA pairs per video", description="Labelled Question/Answer pairs in each video's QA list."
    )
    name_clips: bool = Field(
        True,
        description="each final pair names the clips it is about (\"Clips\": indices into the row's clips, from 0); off: the seed's three keys only",
    )


class VideoQAFinalGenerator(_VideoQAStage):
    """Stage 3: synthesise ``final_pairs`` best pairs, each labelled with one or two of ``LABELS``."""

    name = "video_qa_final"
    makes_dataset = True
    Options = VideoQAFinalOptions
    options: VideoQAFinalOptions

    def answer_model_for(self, clips: int) -> type[BaseModel]:
        """The final answer's schema for a row of ``clips`` clips (with clip numbers, unless ``name_clips`` is off)."""
        return final_model(self.options.final_pairs, self.options.text_limits, clips if self.options.name_clips else None)

    def answer_models(self) -> list[type[BaseModel]]:
        """The final answer, for a row of one clip and of the most clips a row may hold."""
        return [self.answer_model_for(1), self.answer_model_for(self.options.max_clips)]

    def finish_row(self, row: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        """The seed's output row: the carried state leaves the row (it is kept in provenance)."""
        out = {**row, **fields}
        out.pop(self.options.state_key, None)
        return out

    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        opts = self.options
        video = self.read_video(row)
        current = self.current_set(row)
        state = self.read_state(row)
        task = self.prompts.render(
            "final",
            current_qa=qa_json(current),
            current_count=len(current),
            pairs=opts.final_pairs,
            labels=LABELS,
            clip_count=len(video.clips) if opts.name_clips else 0,
        )
        answer = await self.ask(
            self.messages(video, None, task), self.answer_model_for(len(video.clips)), key=f"{origin_key(row)}:final"
        )
        pairs = [
            {
                "Label": LABEL_SEPARATOR.join(p.labels),
                "Question": p.question,
                "Answer": p.answer,
                **({PAIR_CLIPS: [n - 1 for n in p.clips]} if opts.name_clips else {}),
            }
            for p in answer.qa  # type: ignore[attr-defined]
        ]
        unique = dedupe(pairs)
        meta = {"state": state.model_dump(), "duplicates_dropped": len(pairs) - len(unique)}
        if opts.name_clips:
            # a pair's seconds: from its first clip's Start to its last clip's End, where the clips have them (the video ingest's)
            raw = row.get(opts.clips_key) or []
            meta["clip_spans"] = [
                [c.get("Start"), c.get("End")] if isinstance(c, dict) and isinstance(c.get("Start"), int | float) else None
                for c in raw
            ]
        return {opts.output_key: unique}, meta
