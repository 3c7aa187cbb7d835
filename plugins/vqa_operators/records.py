"""The records and manifests that cross modules, one typed model each, defined once.

- a shard of the input (``Shard``), what the plan hands each mapped task;
- a row's final record (``Finished``: kept, rejected or failed, ``Outcome``), the checkpoint's
  line (``Finished.line``), and the entries of the errors file (``ErrorEntry``) and of the
  rejected file (``RejectedEntry``, from a gate's ``PairRejection``);
- one shard's stage manifest (``StageManifest``: a worker's, or dedup's), one stage over all its
  shards (``StageSummary``), and the run's manifest (``RunManifest``), which describes the
  dataset: the DAG and run, each stage's model, prompt hash and errors file.

The writers build these models and the readers validate into them: the run loop, the checkpoint,
dedup, the merge, the preview, the export and the asset event. They leave the process as JSON
(``dump``: XCom, the CLI's output, the files). Plain pydantic, importing only ``settings`` of the
project, so every module may import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from vqa_operators import settings

# bump when the checkpoint line (``Finished``) changes, so that old checkpoints are not reused
CHECKPOINT_FORMAT = 2

Outcome = Literal["kept", "rejected", "failed"]
# what a stage of a run is: a generator's run (the worker: generation, or the quality gate), or dedup's pass over all the
# shards; the merge's is the run's own manifest (RunManifest)
StageKind = Literal["generator", "dedup"]


class Record(BaseModel):
    """A model that crosses modules: unknown keys are refused; ``dump`` is its JSON form (keys in ``OMIT_NONE`` left out when None)."""

    model_config = ConfigDict(extra="forbid")

    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    def dump(self) -> dict[str, Any]:
        found = self.model_dump(mode="json")
        return {key: value for key, value in found.items() if not (value is None and key in self.OMIT_NONE)}


class Shard(Record):
    """Lines ``first_line .. first_line + rows - 1`` of ``input``: its bytes ``[start, end)`` at ``version``.

    A later stage of the same shard reads the previous stage's output for it, a different file:
    there the range does not apply, and the shard only names the task's place in the fan-out.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    index: int = Field(ge=0)
    first_line: int = Field(ge=1)
    rows: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    version: str | None = None
    # the shards in the run's plan: they run at once, so by default they split one server's batch budget between them
    shards: int = Field(1, ge=1)
    # an estimate's plan covers a sample, the input's first lines: how many lines the whole input has
    sample_of: int | None = Field(None, ge=0)


class ErrorEntry(Record):
    """An errors-file line: the input (the row, or the raw line that did not parse) with the stage, the line and why."""

    OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"row", "raw_line", "raw_output"})

    stage: str
    line: int
    reason: str
    detail: str
    row: dict[str, Any] | None = None
    raw_line: str | None = None
    # the model's answer that did not parse, cut to RAW_OUTPUT_LIMIT characters
    raw_output: str | None = None


class DuplicateOf(Record):
    """The earlier pair a near-duplicate repeats: its input line and its index in that row."""

    line: int
    index: int


class BlindCheck(Record):
    """The blind check of one pair: the model's answer without the images, and whether the judge found it agrees with the reference."""

    answer: str
    agrees: bool
    reason: str


class GroundingCheck(Record):
    """The grounding check of one pair: grounded in the images or not, its score (1 contradicted ... 5 fully supported) and why."""

    grounded: bool
    score: int = Field(ge=1, le=5)
    reason: str


class WouldReject(Record):
    """Why a check failed a pair: what ``filter`` rejects it for, or (``annotate``) would."""

    reason: str
    detail: str | None = None


class PairVerdict(Record):
    """What the quality stage found of one pair: the checks it asked, and in ``annotate`` the would-be rejection (None: it passes).

    Its JSON holds only what was found (a check not asked has no key; ``filter`` writes no rejection), so rows read back dump
    as they were written.
    """

    blind: BlindCheck | None = None
    grounding: GroundingCheck | None = None
    rejection: WouldReject | None = None

    @model_serializer(mode="wrap")
    def _what_was_found(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}

    @property
    def score(self) -> int | None:
        """The grounding score, if the pair was grounding-checked."""
        return self.grounding.score if self.grounding is not None else None


class QualityScores(Record):
    """The distribution of judged pairs' verdicts: grounding scores (1-5), blind answers that agreed with the reference over
    those asked, and what ``filter`` rejects (or would, in ``annotate``) by reason."""

    grounding_score: dict[str, int] = Field(default_factory=lambda: {str(score): 0 for score in range(1, 6)})
    blind_asked: int = 0
    blind_agreed: int = 0
    failing: dict[str, int] = Field(default_factory=dict)

    def add(self, verdicts: Iterable[PairVerdict]) -> QualityScores:
        """These counts with ``verdicts`` counted in (in place); returns itself."""
        for verdict in verdicts:
            if verdict.grounding is not None and str(verdict.grounding.score) in self.grounding_score:
                self.grounding_score[str(verdict.grounding.score)] += 1
            if verdict.blind is not None:
                self.blind_asked += 1
                self.blind_agreed += verdict.blind.agrees
            if verdict.rejection is not None:
                self.failing[verdict.rejection.reason] = self.failing.get(verdict.rejection.reason, 0) + 1
        return self

    @classmethod
    def total(cls, parts: Iterable[QualityScores | None]) -> QualityScores | None:
        """The sum of shards' counts (None if no shard judged)."""
        found = [part for part in parts if part is not None]
        if not found:
            return None
        total = cls()
        for part in found:
            for score, n in part.grounding_score.items():
                total.grounding_score[score] = total.grounding_score.get(score, 0) + n
            total.blind_asked += part.blind_asked
            total.blind_agreed += part.blind_agreed
            for reason, n in part.failing.items():
                total.failing[reason] = total.failing.get(reason, 0) + n
        return total

    def describe(self) -> str:
        """``grounding scores 1: 0 · 2: 1 · 3: 4 · 4: 9 · 5: 2; blind answer agreed for 3 of 16; failing a check: not_grounded 1``."""
        scores = " · ".join(f"{score}: {n}" for score, n in sorted(self.grounding_score.items()))
        text = f"grounding scores {scores}; blind answer agreed for {self.blind_agreed} of {self.blind_asked}"
        failing = ", ".join(f"{reason} {n}" for reason, n in sorted(self.failing.items()))
        return text + (f"; failing a check: {failing}" if failing else "; no pair failed a check")


class PairRejection(Record):
    """What a quality decision said of one pair it dropped: the pair, why, and the verdicts (None for a near-duplicate)."""

    index: int
    pair: Any
    reason: str
    detail: str
    verdicts: PairVerdict | None
    duplicate_of: DuplicateOf | None = None


class RejectedEntry(PairRejection):
    """A rejected-file line: the pair a stage dropped and why (``PairRejection``), the stage, the input line, and the row it came from.

    ``row_rejected``: no pair of the row was left at this stage, so the row left the dataset here.
    """

    OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"duplicate_of"})

    stage: str
    line: int
    row_rejected: bool
    row: dict[str, Any]

    @classmethod
    def of(cls, stage: str, line: int, rejection: PairRejection, *, row: dict[str, Any], row_rejected: bool) -> RejectedEntry:
        return cls(stage=stage, line=line, **dict(rejection), row_rejected=row_rejected, row=row)


class Finished(Record):
    """A row's final record, as the checkpoint keeps it and the run loop writes it out.

    Exactly one of three kinds (``kind``):

    - kept: ``out`` (the output row); a quality gate adds ``pairs_kept`` >= 1 and the pairs it
      dropped in ``rejected``;
    - rejected: a quality gate left no pair (``pairs_kept`` 0, ``rejected`` not empty, no ``out``);
    - failed: ``error`` (the errors-file entry, with its reason), nothing else.
    """

    out: dict[str, Any] | None = None
    error: ErrorEntry | None = None
    pairs_kept: int | None = Field(None, ge=0)
    rejected: list[RejectedEntry] = []

    @model_validator(mode="after")
    def _one_kind(self) -> Finished:
        if self.error is not None:
            if self.out is not None or self.rejected or self.pairs_kept is not None:
                raise ValueError("a failed row's record holds its error and nothing else")
        elif self.out is None:
            if self.pairs_kept != 0 or not self.rejected:
                raise ValueError("a record without out or error is a rejected row: pairs_kept 0 and the pairs rejected")
        elif self.pairs_kept == 0:
            raise ValueError("a kept row keeps at least one pair")
        return self

    @property
    def kind(self) -> Outcome:
        return "failed" if self.error is not None else "kept" if self.out is not None else "rejected"

    def line(self, key: str) -> dict[str, Any]:
        """The checkpoint line: the key and the record's fields (the unset ones left out)."""
        return {"key": key, **self.model_dump(mode="json", exclude_defaults=True)}


class Cost(Record):
    """Model calls, prompt and completion tokens per pair (or per row)."""

    requests: float
    prompt_tokens: float
    completion_tokens: float

    @classmethod
    def per(cls, usage: dict[str, int], count: int) -> Cost | None:
        """``usage`` (requests, prompt and completion tokens, and any other counts) per one of ``count`` (None for none)."""
        if not count:
            return None
        return cls(**{key: round(usage[key] / count, 3) for key in cls.model_fields})


class NearDuplicateSettings(Record):
    """The run's near-duplicate check, before any pair is judged: on or off, the Jaccard threshold, and what text is compared."""

    remove_near_duplicates: bool = Field(
        True,
        title="Remove near-duplicates",
        description=(
            "Across all shards, before any pair is judged (the dedup task): a pair whose question nearly repeats an earlier one's is "
            "rejected (near_duplicate); the first is kept. No model calls, and none spent judging duplicates."
        ),
    )
    near_duplicate_threshold: float = Field(
        settings.NEAR_DUPLICATE_THRESHOLD,
        gt=0.0,
        le=1.0,
        title="Near-duplicate threshold",
        description="Jaccard similarity of character 3-grams (lower case, punctuation ignored) at or above which two questions are near-duplicates.",
    )
    near_duplicate_key: Literal["question", "question_answer"] = Field(
        "question",
        title="Near-duplicates compare",
        description=(
            "question: the questions alone; question_answer: question and answer together (two pairs with one "
            "question and different answers are both kept)."
        ),
    )


class NearDuplicateIndex(NearDuplicateSettings):
    """The check as it ran: its settings and the LSH banding chosen for the threshold (None when off)."""

    bands: int | None = None
    rows_per_band: int | None = None


class NearDuplicateSummary(NearDuplicateIndex):
    """The run's near-duplicate pass: the pairs it checked and dropped, and the judge's calls that saved."""

    pairs_checked: int
    duplicates: int
    rows_rejected: int
    judge_calls_per_pair: float
    judge_calls_saved: int


class Counts(Record):
    """What a stage did with its rows and pairs, and what it spent: the counts every manifest holds."""

    rows_in: int = Field(ge=0)
    rows_out: int = Field(ge=0)
    rows_failed: int = Field(ge=0)
    rows_reused: int = Field(0, ge=0)
    rows_rejected: int = Field(0, ge=0)
    pairs_kept: int = Field(0, ge=0)
    pairs_rejected: int = Field(0, ge=0)
    failures_by_reason: dict[str, int] = {}
    rejections_by_reason: dict[str, int] = {}
    requests: int = Field(0, ge=0)
    repairs: int = Field(0, ge=0)
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)


class StageCounts(Counts):
    """A stage's counts, and what the stage is: a generator's run, naming its generator, or dedup's pass, naming none."""

    kind: StageKind = "generator"
    generator: str | None

    @model_validator(mode="after")
    def _generator_of_its_kind(self) -> StageCounts:
        if (self.kind == "generator") != (self.generator is not None):
            raise ValueError("a generator's stage names its generator, and dedup's names none")
        return self


class StageManifest(StageCounts):
    """One stage of one shard, as its task returns it: a worker's run of a generator, or dedup's pass.

    ``errors``: its errors file (None for dedup, whose rows cannot fail); ``rejected``: the pairs
    it dropped (a gate's, or dedup's near-duplicates; None for a generation stage). ``generator``: the generator that ran
    (None for dedup, which is none).
    """

    input: str
    shard: int | None = None
    output: str
    errors: str | None
    rejected: str | None = None
    model: str | None = None
    prompt_sha256: str | None = None
    seed: int | None = None
    try_number: int | None = None
    checkpoint: str | None = None
    # QA pairs in the rows written out, and this stage's model calls and tokens per one of them (None: none written)
    pairs_out: int | None = None
    cost_per_pair: Cost | None = None
    # a gate's verdicts: their distribution
    quality_scores: QualityScores | None = None
    # dedup: the generator whose rows it read, and its index
    source: str | None = None
    near_duplicates: NearDuplicateIndex | None = None
    duration_s: float = Field(ge=0)


class StageSummary(StageCounts):
    """One stage over all the shards of a run: its kind and generator, its counts, its model and prompts, and where its merged files are."""

    shards: int
    output: str | None
    errors: str | None
    rejected: str | None
    model: str | None
    prompt_sha256: str | None
    seed: int | None
    slowest_shard_s: float


# the training-ready formats the merge writes (export.py), and those a run writes unless it says otherwise
Format = Literal["hf", "sharegpt", "llava", "parquet"]
FORMATS: tuple[Format, ...] = ("hf", "sharegpt", "llava", "parquet")
DEFAULT_FORMATS: tuple[Format, ...] = ("hf", "sharegpt", "llava")


class ExportSettings(BaseModel):
    """What ``merge`` exports (the DAG params ``export_formats``, ``copy_media`` and ``embed_images``)."""

    export_formats: list[Format] = Field(
        default_factory=lambda: list(DEFAULT_FORMATS),
        title="Export formats",
        json_schema_extra={"uniqueItems": True},
        description=(
            "Written in the run's folder, with a dataset card (README.md): hf (a Hub-ready folder: Parquet shards with the images and "
            "TRL's messages; datasets.load_dataset(folder)), sharegpt (LLaMA-Factory, registered in dataset_info.json), llava (LLaVA's "
            "conversation JSON), parquet (one flat file with the media's own URIs). Empty: the JSONL and the card only."
        ),
    )
    copy_media: bool = Field(
        True,
        title="Copy media into the dataset",
        description=(
            "sharegpt and llava point at copies in the run's folder (media/<sha256>.<ext>), so the folder is a "
            "self-contained dataset; off: at the media's own URIs."
        ),
    )
    embed_images: bool = Field(
        False,
        title="Embed images in the flat Parquet",
        description="The parquet format only: each image's bytes too (datasets' Image feature), not only its URI. hf always embeds them.",
    )


class Projected(Record):
    """What the whole input would take: model calls, tokens and kept pairs."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    pairs_kept: int


class Estimate(Record):
    """An estimate's run: a sample's cost per row and per kept pair, and the projection for the whole input."""

    sample_rows: int
    input_rows: int
    per_row: Cost | None
    per_kept_pair: Cost | None
    acceptance_rate: float | None
    projected: Projected
    requests_per_s: float | None
    throughput: Literal["given", "measured on the sample"]
    # hours of one model server (times its GPUs for GPU-hours)
    server_hours: float | None


class RunManifest(Counts):
    """The dataset a run made: which DAG and run, from which input, every stage's model, prompt hash and errors file, and its files.

    ``generator``: the generator whose rows the dataset holds (a quality stage keeps its source's
    rows). ``errors``: every stage's errors file, by stage (stages whose rows cannot fail have
    none). ``rejected``: every pair a quality decision dropped, dedup's near-duplicates included.
    """

    dag_id: str | None = None
    run_id: str | None = None
    generator: str
    shards: int
    input: str
    output: str
    errors: dict[str, str]
    rejected: str | None
    acceptance_rate: float | None
    near_duplicates: NearDuplicateSummary | None
    # the judged pairs' grounding scores, blind agreements and failing checks (None: nothing judged)
    quality_scores: QualityScores | None
    # what each pair of the dataset cost, every stage's model calls and tokens included (None: no pair kept)
    cost_per_kept_pair: Cost | None
    stages: dict[str, StageSummary]
    estimate: Estimate | None
    manifest: str
    preview: str
    # the training-ready copies, by format (finalize_run adds them before the manifest is written)
    exports: dict[str, str] = {}
