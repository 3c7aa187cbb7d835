"""The quality gate: judge every QA pair of a row with the model; keep the pairs that need the picture and are grounded in it.

Two checks, each switched by an option, run per pair; pairs of all rows in flight are judged
together (the run loop keeps many rows going, and a row's pairs go at once):

1. **Vision dependency** (``blind_check``): the question is asked with no image (for video, only
   the meta text), then the model decides, as a structured verdict, whether that blind answer
   says what the reference answer says. A pair answerable blind is rejected as
   ``answerable_blind``. Two text-only requests per pair.
2. **Grounding** (``grounding_check``): the model sees the row's images (for video, up to
   ``max_frames`` frames sampled evenly across the clips, with the meta) and the pair, and
   returns ``{"reason", "grounded", "score"}`` (score 1-5). A pair that is not grounded, or
   scores below ``min_judge_score``, is rejected as ``not_grounded``. One request with the
   images per pair, made only for pairs the first check kept.

A model failure during a check (a refused request, an answer that stays unparsable after one
repair) is the row's error, not a rejection: the row goes to the errors file with its reason.
Kept pairs carry their verdicts in the row's provenance (``vqa_provenance.quality.verdicts``,
one per kept pair, in order). A row whose pairs are all rejected leaves the dataset.

``mode``: ``filter`` (the default) drops the pairs that fail; ``annotate`` keeps every pair and
runs every check on each (the grounding check too where the blind check would have rejected),
so that the verdicts, scores and what ``filter`` would have done (``rejection``: reason and
detail, or None) are in the row for filtering later.

Plain Python: it knows nothing of Airflow. Prompts: ``include/prompts/quality/``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, Literal, cast

from pydantic import BaseModel, Field, create_model, field_validator

from vqa_operators import settings
from vqa_operators.exceptions import Reason, Rejection, RowError
from vqa_operators.generators.answers import STRICT, bounded_text
from vqa_operators.generators.base import (
    CLIP_FRAMES,
    PROVENANCE_KEY,
    FrameOptions,
    Generated,
    Generator,
    ImageLimitOptions,
    OutputFields,
    QAItem,
    origin_key,
)
from vqa_operators.media import PreparedImage
from vqa_operators.records import BlindCheck, GroundingCheck, PairRejection, PairVerdict, WouldReject

# the gate's provenance details: each kept pair's verdicts, in order
VERDICTS = "verdicts"


def pair_verdicts(row: dict[str, Any] | None, gate: str | None = None) -> list[PairVerdict]:
    """The verdicts ``gate`` (default the quality gate) wrote for each pair ``row`` kept, in order (empty if it judged none)."""
    details = ((row or {}).get(PROVENANCE_KEY) or {}).get(gate or QualityGate.name)
    verdicts = details.get(VERDICTS) if isinstance(details, dict) else None
    return [PairVerdict.model_validate(v) for v in verdicts] if isinstance(verdicts, list) else []


@functools.cache
def sources() -> tuple[str, ...]:
    """The generators whose rows a gate can judge: those that make a dataset's rows (``Generator.makes_dataset``)."""
    from vqa_operators.generators import GENERATORS, generator_class

    return tuple(name for name in GENERATORS if generator_class(name).makes_dataset)


class QualityOptions(FrameOptions, ImageLimitOptions):
    """Options of the quality gate."""

    source: str = Field(
        description="the generator whose rows are judged: one that makes a dataset's rows (image_qa, pers_qa, video_qa_final)"
    )
    blind_check: bool = Field(
        True,
        title="Check: needs the picture",
        description=(
            "Ask each question without the images (video: with only its meta) and reject the pair (answerable_blind) if the model's "
            "blind answer agrees with the reference. 2 text-only model calls per pair."
        ),
    )
    grounding_check: bool = Field(
        True,
        title="Check: grounded in the picture",
        description=(
            "Show the model the images (video: the sampled frames) with the pair; reject it (not_grounded) if judged not grounded or "
            "scored below the minimum. 1 call with the images per pair the first check kept."
        ),
    )
    min_judge_score: int = Field(
        settings.MIN_JUDGE_SCORE,
        ge=1,
        le=5,
        title="Lowest grounding score",
        description="Pairs the grounding check scores below this (1 contradicted ... 5 fully supported) are rejected as not_grounded.",
    )
    quality_mode: Literal["filter", "annotate"] = Field(
        "filter",
        title="What the checks do",
        description=(
            "filter: drop the pairs that fail a check (to the rejected file, with the reason). annotate: keep every pair, ask every "
            "check of each (3 calls a pair), and write its verdicts, score and would-be rejection into vqa_provenance.quality.verdicts, "
            "to filter later with your own threshold. Near-duplicates are dropped either way."
        ),
    )
    max_answer_chars: int = Field(300, ge=20, le=5_000, description="longest blind answer, in characters")
    max_reason_chars: int = Field(300, ge=20, le=2_000, description="longest verdict reason, in characters")

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source not in sources():
            raise ValueError(f"must be one of {sources()}, got {source!r}")
        return source


class GroundingVerdict(BaseModel):
    """The grounding check's verdict: the schema guided decoding enforces (reason first, so it comes before the call)."""

    model_config = STRICT
    reason: str
    grounded: bool
    score: int = Field(ge=1, le=5)


class BlindAnswer(BaseModel):
    """The model's answer to a question asked without the images."""

    model_config = STRICT
    answer: str


class AgreementVerdict(BaseModel):
    """The vision-dependency check's verdict on a blind answer."""

    model_config = STRICT
    reason: str
    agrees: bool


def verdict_models(max_reason: int, max_answer: int) -> tuple[type[BlindAnswer], type[AgreementVerdict], type[GroundingVerdict]]:
    """(blind answer, agreement verdict, grounding verdict) with their text bounds in the schema."""
    blind = create_model("BlindAnswer", __base__=BlindAnswer, answer=(str, bounded_text(max_answer)))
    agreement = create_model("AgreementVerdict", __base__=AgreementVerdict, reason=(str, bounded_text(max_reason)))
    grounding = create_model("GroundingVerdict", __base__=GroundingVerdict, reason=(str, bounded_text(max_reason)))
    return blind, agreement, grounding


class QualityGate(Generator):
    """Judges the pairs of ``source``'s rows; keeps the ones that need the picture and are grounded in it."""

    name = "quality"
    Options = QualityOptions
    gate = True
    options: QualityOptions

    @classmethod
    def output_fields(cls, options: QualityOptions) -> OutputFields:
        """The source generator's fields (with its default options: ``row_output_fields`` reads the ones a run used)."""
        from vqa_operators.generators import generator_class

        source = generator_class(options.source)
        return source.output_fields(source.parse_options(None))

    @classmethod
    def judged_source(cls, options: QualityOptions) -> str | None:
        return options.source

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opts = self.options
        self.blind_model, self.agreement_model, self.grounding_model = verdict_models(
            opts.max_reason_chars, opts.max_answer_chars
        )
        self._fields: dict[str, OutputFields] = {}

    def answer_models(self) -> list[type[BaseModel]]:
        return [self.blind_model, self.agreement_model, self.grounding_model]

    def fields(self, row: dict[str, Any]) -> OutputFields:
        """Where this row keeps its pairs: the source's fields, with the options its run used."""
        from vqa_operators.generators import row_output_fields

        provenance = (row.get(PROVENANCE_KEY) or {}).get(self.options.source, {})
        cache_key = json.dumps(provenance.get("options"), sort_keys=True, default=str)
        if cache_key not in self._fields:
            self._fields[cache_key] = row_output_fields(self.options.source, row)
        return self._fields[cache_key]

    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The row's fields after the gate (the kept pairs) and the verdicts; rejected pairs are dropped."""
        judged = await self.judge(row)
        return judged.fields, judged.meta

    async def run_row(self, row: dict[str, Any]) -> Generated:
        return await self.judge(row)

    async def judge(self, row: dict[str, Any]) -> Generated:
        """Every pair of ``row`` through the checks; the kept pairs, their verdicts, and the rejected pairs with theirs."""
        fields = self.fields(row)
        if row.get(fields.qa) is None:
            raise RowError(Reason.MISSING_FIELD, f"the row has no {fields.qa!r} QA to judge")
        items = fields.pairs(row)
        if not items:
            raise RowError(Reason.BAD_FIELD, f"{fields.qa!r} holds no question-answer pair to judge")
        key = origin_key(row)
        images = _Lazy(self._images, row, fields)
        verdicts = await asyncio.gather(*(self._judge_pair(row, fields, item, images, key) for item in items))
        kept: list[int] = []
        kept_verdicts: list[PairVerdict] = []
        rejected: list[PairRejection] = []
        annotate = self.options.quality_mode == "annotate"
        for item, (verdict, rejection) in zip(items, verdicts, strict=True):
            if annotate:
                kept.append(item.index)
                kept_verdicts.append(
                    verdict.model_copy(
                        update={"rejection": None if rejection is None else WouldReject(reason=rejection[0], detail=rejection[1])}
                    )
                )
            elif rejection is None:
                kept.append(item.index)
                kept_verdicts.append(verdict)
            else:
                reason, detail = rejection
                rejected.append(PairRejection(index=item.index, pair=item.raw, reason=reason, detail=detail, verdicts=verdict))
        trimmed = fields.keep(row, kept)
        out_fields = {fields.qa: trimmed[fields.qa]} if fields.qa in trimmed else {}
        meta = {
            VERDICTS: [v.model_dump(mode="json") for v in kept_verdicts],
            "pairs_in": len(items),
            "rejected": [{"index": r.index, "reason": r.reason} for r in rejected],
            "mode": self.options.quality_mode,
        }
        if images.loaded:
            meta["images_sent"] = len(images.value or [])
        return Generated(out_fields, meta, rejected=rejected, pairs_kept=len(kept))

    async def _judge_pair(
        self, row: dict[str, Any], fields: OutputFields, item: QAItem, images: _Lazy, key: str
    ) -> tuple[PairVerdict, tuple[Rejection, str] | None]:
        opts = self.options
        verdict = PairVerdict()
        pair_key = f"{key}:{item.index}"
        # filter: the first failed check decides, and the later ones are not asked; annotate: every check is asked
        failed: tuple[Rejection, str] | None = None
        if opts.blind_check:
            meta = self._meta(row, fields)
            messages = [
                {"role": "system", "content": self.prompts.render("system")},
                {"role": "user", "content": self.prompts.render("blind", question=item.question, meta=meta)},
            ]
            blind = cast(BlindAnswer, await self.ask(messages, self.blind_model, key=f"{pair_key}:blind"))
            judge = [
                {"role": "system", "content": self.prompts.render("system")},
                {
                    "role": "user",
                    "content": self.prompts.render(
                        "agreement", question=item.question, reference=item.answer, candidate=blind.answer
                    ),
                },
            ]
            agreement = cast(AgreementVerdict, await self.ask(judge, self.agreement_model, key=f"{pair_key}:agreement"))
            verdict.blind = BlindCheck(answer=blind.answer, agrees=agreement.agrees, reason=agreement.reason)
            if agreement.agrees:
                failed = (Rejection.ANSWERABLE_BLIND, f"answered without the images: {blind.answer!r}")
                if opts.quality_mode == "filter":
                    return verdict, failed
        if opts.grounding_check:
            prepared = await images.get()
            text = self.prompts.render(
                "grounding",
                question=item.question,
                answer=item.answer,
                labels=item.labels,
                meta=self._meta(row, fields),
                image_count=len(prepared),
                video=fields.clips is not None,
            )
            messages = [{"role": "system", "content": self.prompts.render("system")}, self.user_message(prepared, text)]
            grounding = cast(GroundingVerdict, await self.ask(messages, self.grounding_model, key=f"{pair_key}:grounding"))
            verdict.grounding = GroundingCheck(grounded=grounding.grounded, score=grounding.score, reason=grounding.reason)
            if not grounding.grounded or grounding.score < opts.min_judge_score:
                why = (
                    "not grounded"
                    if not grounding.grounded
                    else f"score {grounding.score} < min_judge_score {opts.min_judge_score}"
                )
                failed = failed or (Rejection.NOT_GROUNDED, f"{why}: {grounding.reason}")
        return verdict, failed

    def _meta(self, row: dict[str, Any], fields: OutputFields) -> str | None:
        """A video's meta text (it may stay in the blind prompt: it says what the video is, not what it shows)."""
        if fields.meta is None:
            return None
        value = row.get(fields.meta)
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else str(value) if value is not None else None

    async def _images(self, row: dict[str, Any], fields: OutputFields) -> list[PreparedImage]:
        """The row's images, or a video's sampled frames, as the grounding check sends them."""
        opts = self.options
        if fields.clips is not None:
            from vqa_operators.generators.video_qa import Clip, sample_frames

            raw = self.required(row, fields.clips)
            if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
                raise RowError(Reason.BAD_FIELD, f"{fields.clips!r} must be a list of clips")
            try:
                clips = [Clip.model_validate(c) for c in raw]
            except ValueError as err:
                raise RowError(Reason.BAD_FIELD, f"{fields.clips!r}: {err}") from None
            frames = sample_frames(clips, opts.max_frames)
            if not frames:
                raise RowError(Reason.BAD_FIELD, f"no clip has any frame in {CLIP_FRAMES!r}")
            return await self.media.prepare([f.path for f in frames], max_pixels=opts.frame_max_pixels)
        assert fields.images is not None
        return await self.media.prepare(self.image_paths(row, fields.images, opts.max_images_per_row))


class _Lazy:
    """A row's images, prepared once, by the first pair that needs them (none if every pair was rejected blind)."""

    def __init__(self, load: Any, *args: Any) -> None:
        self._load, self._args = load, args
        self._task: asyncio.Future[list[PreparedImage]] | None = None
        self.value: list[PreparedImage] | None = None

    @property
    def loaded(self) -> bool:
        return self._task is not None

    async def get(self) -> list[PreparedImage]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._load(*self._args))
        value = await asyncio.shield(self._task)
        self.value = value
        return value
