"""Scripted verdicts for the test double: which pairs the quality gate's judge keeps, and why, decided from the question.

The double answers every request with JSON built from its schema (``openai_server.schema_instance``);
for the quality gate's two verdict schemas it takes these fields from a ``ScriptedVerdicts``
instead, and still checks the answer against the request's grammar, as guided decoding would.
Tests choose the rule, so they can assert which pairs are kept and which are rejected, with
which reason. The double's default keeps every pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

AGREEMENT = "AgreementVerdict"
GROUNDING = "GroundingVerdict"


def judged_pair(body: dict[str, Any]) -> tuple[str, str]:
    """The pair a verdict request is about: the ``Question: ...`` and the (reference) ``Answer: ...`` lines of its last user turn."""
    content = body["messages"][-1]["content"]
    text = content if isinstance(content, str) else "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
    found: dict[str, str] = {}
    for line in text.splitlines():
        for label in ("Question: ", "Answer: ", "Reference answer: "):
            if line.startswith(label):
                found.setdefault("answer" if label != "Question: " else "question", line.removeprefix(label))
    if set(found) != {"question", "answer"}:
        raise ValueError(f"no 'Question: ' and answer lines in the verdict request: {text[:300]!r}")
    return found["question"], found["answer"]


@dataclass
class ScriptedVerdicts:
    """``answerable_blind(question, answer)``: the blind answer agrees; ``score(question, answer)``: the grounding score (grounded iff >= 3)."""

    answerable_blind: Callable[[str, str], bool] = lambda question, answer: False
    score: Callable[[str, str], int] = lambda question, answer: 5

    def fields(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The verdict fields for this request, or None if it is not a verdict request."""
        name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
        if name == AGREEMENT:
            return {"agrees": bool(self.answerable_blind(*judged_pair(body)))}
        if name == GROUNDING:
            score = int(self.score(*judged_pair(body)))
            return {"score": score, "grounded": score >= 3}
        return None


KEEP_ALL = ScriptedVerdicts()
