"""What a reader sees of one output row, as the generator's output declaration reads it: the preview shows it, the export writes it.

Plain Python: it knows nothing of Airflow or of HTML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vqa_operators.generators.base import OutputFields, path_list
from vqa_operators.generators.quality import pair_verdicts
from vqa_operators.records import RejectedEntry

# characters of a rejected pair's detail kept
DETAIL_SHOWN = 300


@dataclass(frozen=True)
class ShownPair:
    """A kept QA pair: its labels, text, grounding score (None: not grounding-checked), and the clips and seconds it is about."""

    labels: list[str]
    question: str
    answer: str
    score: int | None
    clips: list[int]
    span: tuple[float, float] | None


@dataclass(frozen=True)
class DroppedPair:
    """A pair a quality decision dropped: its text, why, its grounding score, and the detail (cut to ``DETAIL_SHOWN``)."""

    question: str
    answer: str
    reason: str
    score: int | None
    detail: str


@dataclass
class RowView:
    """One output row as a reader sees it. ``media``: what the preview made of ``paths`` (it fills it in)."""

    kind: Literal["image", "video"]
    n: int
    title: str
    paths: list[str]
    qa: list[ShownPair]
    rejected: list[DroppedPair]
    frames_total: int | None = None
    media: list[Any] = field(default_factory=list)


def describe_row(fields: OutputFields, n: int, row: dict[str, Any], rejected: list[RejectedEntry] | None = None) -> RowView:
    """What a reader sees of one output row: its kind, media paths, title, kept QA pairs (with their grounding score) and rejected ones.

    ``n``: the row's line in the output; ``rejected``: the rejected-file entries of its pairs (the preview shows them beside the kept ones).
    """
    verdicts = pair_verdicts(row)
    qa = [
        ShownPair(
            labels=item.labels,
            question=item.question,
            answer=item.answer,
            score=verdicts[k].score if k < len(verdicts) else None,
            clips=item.clips,
            span=fields.span(row, item),
        )
        for k, item in enumerate(fields.pairs(row))
    ]
    dropped = []
    for entry in rejected or []:
        pair = fields.pairs({fields.qa: [entry.pair] if fields.form != "text" else entry.pair})
        if pair:
            score = entry.verdicts.score if entry.verdicts is not None else None
            dropped.append(
                DroppedPair(
                    question=pair[0].question,
                    answer=pair[0].answer,
                    reason=entry.reason,
                    score=score,
                    detail=entry.detail[:DETAIL_SHOWN],
                )
            )
    if fields.clips is not None:
        frames, frames_total = fields.frames_shown(row)
        return RowView(
            kind="video", n=n, title=fields.title(row)[:160], paths=frames, qa=qa, rejected=dropped, frames_total=frames_total
        )
    paths = path_list(row.get(fields.images)) if fields.images else []
    return RowView(kind="image", n=n, title=", ".join(paths)[:160], paths=paths, qa=qa, rejected=dropped)
