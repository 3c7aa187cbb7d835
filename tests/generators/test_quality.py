"""The quality gate (worker command ``run quality``) against the test double's scripted verdicts: which pairs are kept, which are rejected, and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testkit.data import job_options, make_jpeg, read_rows, write_image_rows
from testkit.openai_server import OpenAITestServer, Reply
from testkit.verdicts import AGREEMENT, GROUNDING, ScriptedVerdicts
from vqa_operators.exceptions import ConfigError
from vqa_operators.worker import run_job


def _schema_names(server: OpenAITestServer) -> list[str]:
    return [r["response_format"]["json_schema"]["name"] for r in server.requests]


def generated(server: OpenAITestServer, folder: Path, rows: int = 4, pairs: int = 3) -> Path:
    """image_qa's output over ``rows`` rows with ``pairs`` pairs each (``folder/gen/rows.jsonl``)."""
    source = write_image_rows(folder, rows)
    manifest = run_job(
        job_options(server, folder, source, output=str(folder / "gen" / "rows.jsonl"), params={"pairs_per_row": pairs})
    )
    assert manifest.rows_out == rows
    server.requests.clear()
    return folder / "gen" / "rows.jsonl"


def gate(server: OpenAITestServer, folder: Path, rows: Path, **params: Any) -> dict[str, Any]:
    """The quality gate over ``rows`` into ``folder/q/rows.jsonl``; ``params`` are its options."""
    return run_job(
        job_options(
            server,
            folder,
            rows,
            generator="quality",
            output=str(folder / "q" / "rows.jsonl"),
            params={"source": "image_qa", **params},
        )
    )


def _pair_number(question: str) -> int:
    """The double writes "question <n>: ..." for the n-th pair of a set."""
    return int(question.split(":", 1)[0].removeprefix("question "))


def test_pairs_are_kept_or_rejected_by_the_scripted_verdicts_with_reasons_and_verdicts(
    vlm_server: OpenAITestServer, tmp_path: Path
) -> None:
    source = generated(vlm_server, tmp_path)
    # pair 2 of every row is answerable blind; pair 3 scores 2 (below the default 3)
    vlm_server.verdicts = ScriptedVerdicts(
        answerable_blind=lambda q, a: _pair_number(q) == 2, score=lambda q, a: 2 if _pair_number(q) == 3 else 4
    )
    manifest = gate(vlm_server, tmp_path, source)

    out = read_rows(tmp_path / "q" / "rows.jsonl")
    rejected = read_rows(tmp_path / "q" / "rows.rejected.jsonl")
    assert (manifest.rows_in, manifest.rows_out, manifest.rows_failed, manifest.rows_rejected) == (4, 4, 0, 0)
    assert (manifest.pairs_kept, manifest.pairs_rejected) == (4, 8)
    assert manifest.rejections_by_reason == {"answerable_blind": 4, "not_grounded": 4}
    assert all([_pair_number(p["question"]) for p in row["qa_pairs"]] == [1] for row in out)
    # kept pairs carry their verdicts in provenance, one per kept pair
    for row in out:
        verdicts = row["vqa_provenance"]["quality"]["verdicts"]
        assert len(verdicts) == 1 and verdicts[0]["blind"]["agrees"] is False and verdicts[0]["grounding"]["score"] == 4
    assert sorted((e["reason"], e["index"]) for e in rejected) == [("answerable_blind", 1)] * 4 + [("not_grounded", 2)] * 4
    for entry in rejected:
        assert entry["stage"] == "quality" and entry["row_rejected"] is False and entry["line"] in (1, 2, 3, 4)
        assert entry["pair"] == entry["row"]["qa_pairs"][entry["index"]]
    blind = next(e for e in rejected if e["reason"] == "answerable_blind")
    assert blind["verdicts"]["blind"]["agrees"] is True and "grounding" not in blind["verdicts"]
    ungrounded = next(e for e in rejected if e["reason"] == "not_grounded")
    assert ungrounded["verdicts"]["grounding"] == {
        "grounded": False,
        "score": 2,
        "reason": ungrounded["verdicts"]["grounding"]["reason"],
    }
    assert "score 2 < min_judge_score 3" in ungrounded["detail"] or "not grounded" in ungrounded["detail"]
    # the calls: 2 text-only calls per pair, and 1 with the images per pair the blind check kept
    names = _schema_names(vlm_server)
    assert (names.count("BlindAnswer"), names.count(AGREEMENT), names.count(GROUNDING)) == (12, 12, 8)
    for request in vlm_server.requests:
        images = [
            p for m in request["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url"
        ]
        name = request["response_format"]["json_schema"]["name"]
        assert (len(images) > 0) == (name == GROUNDING)


def test_a_row_with_every_pair_rejected_goes_to_the_rejected_file_as_a_row(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    source = generated(vlm_server, tmp_path, rows=4, pairs=2)
    rows = read_rows(source)
    doomed = {p["question"] for p in rows[0]["qa_pairs"]}
    vlm_server.verdicts = ScriptedVerdicts(score=lambda q, a: 1 if q in doomed else 5)
    manifest = gate(vlm_server, tmp_path, source)
    assert (manifest.rows_out, manifest.rows_rejected, manifest.pairs_kept, manifest.pairs_rejected) == (3, 1, 6, 2)
    rejected = read_rows(tmp_path / "q" / "rows.rejected.jsonl")
    assert [(e["line"], e["reason"], e["row_rejected"]) for e in rejected] == [(1, "not_grounded", True)] * 2
    assert [r["id"] for r in read_rows(tmp_path / "q" / "rows.jsonl")] == [1, 2, 3]


def test_switching_checks_off_changes_the_calls_and_the_threshold_decides(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    source = generated(vlm_server, tmp_path, rows=2, pairs=2)
    vlm_server.verdicts = ScriptedVerdicts(answerable_blind=lambda q, a: True, score=lambda q, a: 3)
    manifest = gate(vlm_server, tmp_path, source, blind_check=False, min_judge_score=4)
    assert _schema_names(vlm_server) == [GROUNDING] * 4
    assert manifest.rejections_by_reason == {"not_grounded": 4} and manifest.rows_rejected == 2
    vlm_server.requests.clear()
    manifest = gate(vlm_server, tmp_path, source, grounding_check=False, blind_check="False")
    assert vlm_server.requests == [] and manifest.pairs_kept == 4 and manifest.rejections_by_reason == {}
    with pytest.raises(ConfigError, match="min_judge_score"):
        gate(vlm_server, tmp_path, source, min_judge_score=6)
    with pytest.raises(ConfigError, match="source"):
        gate(vlm_server, tmp_path, source, source="video_qa_initial")


def test_a_model_failure_during_a_check_is_an_error_not_a_rejection(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    source = generated(vlm_server, tmp_path, rows=1, pairs=1)
    # the blind answer is not JSON, twice (the repair too): the row fails with the parse reason
    vlm_server.enqueue(Reply(spoil="invalid_json"), Reply(spoil="invalid_json"))
    manifest = gate(vlm_server, tmp_path, source)
    assert (manifest.rows_out, manifest.rows_failed, manifest.rows_rejected, manifest.pairs_rejected) == (0, 1, 0, 0)
    errors = read_rows(tmp_path / "q" / "rows.errors.jsonl")
    assert [(e["stage"], e["reason"], e["line"]) for e in errors] == [("quality", "invalid_json", 1)]
    assert read_rows(tmp_path / "q" / "rows.rejected.jsonl") == []


def test_rows_without_pairs_to_judge_go_to_errors(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.jpg").write_bytes(make_jpeg())
    source = tmp_path / "in.jsonl"
    source.write_text(
        "\n".join(
            json.dumps(r)
            for r in ({"image": "a.jpg"}, {"image": "a.jpg", "qa_pairs": []}, {"image": "a.jpg", "qa_pairs": [{"q": 1}]})
        )
        + "\n"
    )
    manifest = gate(vlm_server, tmp_path, source)
    assert manifest.failures_by_reason == {"bad_field": 2, "missing_field": 1} and vlm_server.requests == []


def test_the_readme_documents_every_rejection_reason() -> None:
    from tests.helpers import ROOT
    from vqa_operators.exceptions import Rejection

    section = (ROOT / "README.md").read_text().split("## Quality checks", 1)[1].split("\n## ", 1)[0]
    assert [r.value for r in Rejection if f"`{r.value}`" not in section] == []


@pytest.mark.usefixtures("fast_backoff")
def test_a_retried_gate_reuses_its_kept_rejected_and_failed_rows(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    from testkit.openai_server import outage_after
    from vqa_operators.exceptions import ServerUnavailableError

    rows = read_rows(generated(vlm_server, tmp_path, rows=3, pairs=1))
    bad = {"image": rows[0]["image"], "qa_pairs": []}
    source = tmp_path / "gate-in.jsonl"
    # line 1 is rejected (its only pair scores 1), line 2 fails (no pairs to judge), line 3 is kept, line 4 meets the outage
    source.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], bad, rows[1], rows[2])))
    doomed = rows[0]["qa_pairs"][0]["question"]
    verdicts = ScriptedVerdicts(score=lambda q, a: 1 if q == doomed else 5)

    def try_gate() -> dict[str, Any]:
        return run_job(
            job_options(
                vlm_server,
                tmp_path,
                source,
                generator="quality",
                output=str(tmp_path / "q" / "rows.jsonl"),
                params={"source": "image_qa"},
                concurrency=1,
                checkpoint_every=1,
                max_consecutive_failures=2,
                max_retries=1,
            )
        )

    vlm_server.verdicts, vlm_server.responder = verdicts, outage_after(6)  # 3 calls each for lines 1 and 3
    with pytest.raises(ServerUnavailableError):
        try_gate()
    vlm_server.reset()
    vlm_server.verdicts = verdicts
    manifest = try_gate()
    # only line 4 is judged again: the rejected, the failed and the kept rows come from the checkpoint
    assert (manifest.rows_reused, manifest.requests, len(vlm_server.requests)) == (3, 3, 3)
    assert (manifest.rows_out, manifest.rows_rejected, manifest.rows_failed, manifest.pairs_kept, manifest.pairs_rejected) == (
        2,
        1,
        1,
        2,
        1,
    )
    assert [e["line"] for e in read_rows(tmp_path / "q" / "rows.rejected.jsonl")] == [1]
    assert [e["reason"] for e in read_rows(tmp_path / "q" / "rows.errors.jsonl")] == ["bad_field"]


def test_annotate_keeps_every_pair_with_every_checks_verdict_and_what_filter_would_do(
    vlm_server: OpenAITestServer, tmp_path: Path
) -> None:
    source = generated(vlm_server, tmp_path)
    # as in the filter test: pair 2 of every row is answerable blind, pair 3 scores 2
    vlm_server.verdicts = ScriptedVerdicts(
        answerable_blind=lambda q, a: _pair_number(q) == 2, score=lambda q, a: 2 if _pair_number(q) == 3 else 4
    )
    manifest = gate(vlm_server, tmp_path, source, quality_mode="annotate")
    out = read_rows(tmp_path / "q" / "rows.jsonl")
    assert (manifest.rows_out, manifest.pairs_kept, manifest.pairs_rejected, manifest.rows_rejected) == (4, 12, 0, 0)
    assert read_rows(tmp_path / "q" / "rows.rejected.jsonl") == []
    for row in out:
        verdicts = row["vqa_provenance"]["quality"]["verdicts"]
        assert [_pair_number(p["question"]) for p in row["qa_pairs"]] == [1, 2, 3] and row["vqa_provenance"]["quality"][
            "mode"
        ] == "annotate"
        # every check asked of every pair, the blind-answerable one's grounding too
        assert [v["grounding"]["score"] for v in verdicts] == [4, 4, 2] and [v["blind"]["agrees"] for v in verdicts] == [
            False,
            True,
            False,
        ]
        assert [v["rejection"] and v["rejection"]["reason"] for v in verdicts] == [None, "answerable_blind", "not_grounded"]
    names = _schema_names(vlm_server)
    assert (names.count("BlindAnswer"), names.count(AGREEMENT), names.count(GROUNDING)) == (12, 12, 12)
    # the verdicts' distribution, for the preview and the card
    assert manifest.quality_scores.dump() == {
        "grounding_score": {"1": 0, "2": 4, "3": 0, "4": 8, "5": 0},
        "blind_asked": 12,
        "blind_agreed": 4,
        "failing": {"answerable_blind": 4, "not_grounded": 4},
    }
    # filter, on the same verdicts, counts the same distribution from what it kept and rejected (it asks no grounding of
    # a blind-answerable pair, so those four have no score)
    vlm_server.requests.clear()
    filtered = gate(vlm_server, tmp_path, source)
    assert filtered.quality_scores.dump() == {
        "grounding_score": {"1": 0, "2": 4, "3": 0, "4": 4, "5": 0},
        "blind_asked": 12,
        "blind_agreed": 4,
        "failing": {"answerable_blind": 4, "not_grounded": 4},
    }
    with pytest.raises(ConfigError, match="quality_mode"):
        gate(vlm_server, tmp_path, source, quality_mode="drop")


def test_a_pair_verdict_dumps_what_was_found_and_reads_back_as_written() -> None:
    from pydantic import ValidationError

    from vqa_operators.records import PairVerdict, QualityScores

    blind_only = {
        "blind": {"answer": "a dog", "agrees": True, "reason": "the same animal"}
    }  # filter: the first failed check decides
    annotated = {**blind_only, "grounding": {"grounded": True, "score": 4, "reason": "shown"}, "rejection": None}
    would = {**annotated, "rejection": {"reason": "answerable_blind", "detail": "answered without the images: 'a dog'"}}
    for written in (blind_only, annotated, would):
        assert PairVerdict.model_validate(written).model_dump(mode="json") == written
    assert [PairVerdict.model_validate(v).score for v in (blind_only, annotated)] == [None, 4]
    with pytest.raises(ValidationError):
        PairVerdict.model_validate({**annotated, "grounding": {"grounded": True, "score": 9, "reason": "out of range"}})
    counts = QualityScores().add(PairVerdict.model_validate(v) for v in (blind_only, annotated, would))
    assert (counts.grounding_score["4"], counts.blind_asked, counts.blind_agreed, counts.failing) == (
        2,
        3,
        3,
        {"answerable_blind": 1},
    )
    assert QualityScores.total([counts, None, counts]).blind_asked == 6 and QualityScores.total([None]) is None
