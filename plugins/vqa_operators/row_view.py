"""What a reader sees of one output row, as the generator's output declaration reads it: the preview shows it, the export writes it.

Plain Python: it knows nothing of Airflow or of HTML.
"""

from __future__ import annotations

from typing import Any

from vqa_operators.generators.base import OutputFields, path_list
from vqa_operators.generators.quality import grounding_score, pair_verdicts

# characters of a rejected pair's detail kept
DETAIL_SHOWN = 300


def describe_row(fields: OutputFields, n: int, row: dict[str, Any], rejected: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a reader sees of one output row: its kind, media paths, title, kept QA pairs (with their grounding score) and rejected ones.

    ``n``: the row's line in the output; ``rejected``: the rejected-file entries of its pairs (the preview shows them beside the kept ones).
    """
    verdicts = pair_verdicts(row)
    items = fields.pairs(row)
    qa = [
        {
            "labels": item.labels, "question": item.question, "answer": item.answer, "score": grounding_score(verdicts[k]) if k < len(verdicts) else None,
            "clips": item.clips, "span": fields.span(row, item),
        }
        for k, item in enumerate(items)
    ]
    dropped = []
    for entry in rejected or []:
        pair = fields.pairs({fields.qa: [entry.get("pair")] if fields.form != "text" else entry.get("pair")})
        if pair:
            dropped.append({"question": pair[0].question, "answer": pair[0].answer, "reason": entry.get("reason"), "score": grounding_score(entry.get("verdicts")), "detail": str(entry.get("detail", ""))[:DETAIL_SHOWN]})
    if fields.clips is not None:
        frames, frames_total = fields.frames_shown(row)
        return {"kind": "video", "n": n, "title": fields.title(row)[:160], "paths": frames, "qa": qa, "rejected": dropped, "frames_total": frames_total}
    paths = path_list(row.get(fields.images)) if fields.images else []
    title = ", ".join(paths)[:160]
    return {"kind": "image", "n": n, "title": title, "paths": paths, "qa": qa, "rejected": dropped}
