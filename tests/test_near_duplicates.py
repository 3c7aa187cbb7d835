"""Near-duplicate questions across a whole run: the index (``dedup.py``) and the merge that drops later occurrences."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from testkit.data import job_options, make_jpeg, read_rows
from testkit.verdicts import ScriptedVerdicts
from vqa_operators import dedup
from vqa_operators.dedup import NUM_PERM, NearDuplicates, _grams, jaccard, shingles, signatures
from vqa_operators.exceptions import InputError
from vqa_operators.merge import deduplicate_shards, merge_run
from vqa_operators.preview import render_preview
from vqa_operators.records import NearDuplicateSettings, Shard, StageManifest
from vqa_operators.sharding import plan_shards
from vqa_operators.storage import Storage
from vqa_operators.worker import run_job


def _matches(index: NearDuplicates, texts: list) -> list:
    index.add_many(texts)
    return list(index.matches())


def test_the_index_keeps_the_first_occurrence_and_names_it() -> None:
    with NearDuplicates(0.8) as index:
        found = _matches(
            index,
            [
                ("What color is the car?", [1, 0]),
                ("what COLOR is the car", [2, 0]),
                ("What color is the bus?", [3, 0]),
                ("What color is the car?!", [9, 9]),
            ],
        )
        assert found[0] is None and found[2] is None
        assert found[1] is not None and found[1].first == [1, 0] and found[1].similarity == 1.0
        assert found[3] is not None and found[3].first == [1, 0]
        assert (index.added, index.kept, index.duplicates) == (4, 2, 2)
        with pytest.raises(RuntimeError, match="after matches"):
            index.add_many([("late", 5)])


def test_the_threshold_is_the_exact_jaccard_of_3_grams() -> None:
    a, b = "What color is the car?", "What colour is the car?"
    similarity = jaccard(shingles(a), shingles(b))
    assert 0.75 < similarity < 0.8
    with NearDuplicates(0.8) as strict:
        assert _matches(strict, [(a, 1), (b, 2)]) == [None, None]
    # LSH finds a pair at the threshold itself with about 95% probability, and at 0.07 above it with 99%: 0.7 here
    with NearDuplicates(0.7) as loose:
        found = _matches(loose, [(a, 1), (b, 2)])
        assert found[0] is None and found[1] is not None and found[1].first == 1
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicates(0.0)


def test_a_signature_is_the_minimum_over_its_3_grams_and_estimates_their_jaccard() -> None:
    texts = ["how many red cups are on the table", "how many red cups are on the tables", "where is the dog", "ab", "", "a"]
    signed = signatures(texts)
    assert signed.shape == (6, NUM_PERM) and signed.dtype == np.uint32
    # MinHash: a set's value per permutation is the least of its members' values; a text's members are its 3-grams
    for text, values in zip(texts, signed, strict=True):
        assert (np.min(signatures(sorted(_grams(text))), axis=0) == values).all()
    # the fraction of equal values estimates the Jaccard similarity (within 4 standard deviations over 128 permutations)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        exact = jaccard(_grams(texts[i]), _grams(texts[j]))
        assert abs((signed[i] == signed[j]).mean() - exact) <= 4 * max(exact * (1 - exact), 0.01) ** 0.5 / NUM_PERM**0.5
    # short texts are padded, not confused with each other
    assert len({tuple(v) for v in signed[3:]}) == 3


def _templated(count: int) -> list[tuple[str, int]]:
    rng = random.Random(7)
    words = ["red", "blue", "green", "wooden", "metal", "round", "square", "small", "large", "striped", "shiny", "broken"]
    things = ["cups", "chairs", "books", "lamps", "bottles", "plates", "boxes", "shoes", "apples", "keys", "pens", "clocks"]
    return [
        (f"How many {rng.choice(words)} {rng.choice(things)} are on the {rng.choice(words)} {rng.choice(things)} near {n}?", n)
        for n in range(count)
    ]


def test_the_index_finds_near_duplicates_among_many_texts() -> None:
    # 2,000 questions from one template (they share many 3-grams, as generated questions do), then the first 200 again
    # in other case and punctuation: each repeat names its first occurrence, and no original is taken for another
    texts = _templated(2000)
    repeats = [(text.upper().replace("?", " !"), 10_000 + n) for text, n in texts[:200]]
    with NearDuplicates(0.8) as index:
        found_all = _matches(index, texts + repeats)
    originals, found = found_all[:2000], found_all[2000:]
    assert all(m is None or jaccard(shingles(texts[n][0]), shingles(texts[m.first][0])) >= 0.8 for n, m in enumerate(originals))
    # a repeat of a kept question shares every band with it: always found, and named
    assert all(f is not None and f.first == n for n, (o, f) in enumerate(zip(originals[:200], found, strict=True)) if o is None)
    # a repeat of a question that was itself dropped is found through the kept one it resembles: LSH and the candidate
    # cap make that likely, not certain
    assert sum(f is not None for f in found) >= 198
    assert all(
        jaccard(shingles(text), shingles(texts[f.first][0])) >= 0.8
        for (text, _), f in zip(repeats, found, strict=True)
        if f is not None
    )
    # a match is always of a text that was kept
    assert all(originals[f.first] is None for f in found if f is not None)


def test_a_bucket_too_large_to_sort_at_once_is_split_and_gives_the_same_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _templated(3000)
    texts += [(text.replace("How", "how").rstrip("?"), 20_000 + n) for text, n in texts[:300]]
    with NearDuplicates(0.8) as whole:
        expected = _matches(whole, texts)
    # 82,500 band keys in 64 buckets: about 1,300 records each, so 500 splits every bucket, and its parts again
    monkeypatch.setattr(dedup, "MAX_BUCKET", 500)
    monkeypatch.setattr(dedup, "BLOCK", 700)
    with NearDuplicates(0.8) as split:
        assert _matches(split, texts) == expected
    assert sum(m is not None for m in expected) >= 300


def test_a_block_with_too_many_pairs_is_split_by_text_range_and_gives_the_same_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _templated(3000)
    texts += [(text.replace("How", "how").rstrip("?"), 20_000 + n) for text, n in texts[:300]]
    with NearDuplicates(0.8) as whole:
        expected = _matches(whole, texts)
    ranges: list[tuple[int, int, int]] = []
    resolve = NearDuplicates._resolve

    def counted(self, start, end, path, kept, np):
        ranges.append((start, end, path.stat().st_size // 8 if path.exists() else 0))
        yield from resolve(self, start, end, path, kept, np)

    monkeypatch.setattr(NearDuplicates, "_resolve", counted)
    monkeypatch.setattr(dedup, "MAX_PAIRS", 2000)
    with NearDuplicates(0.8) as split:
        assert _matches(split, texts) == expected
    # one block of 3,300 texts, resolved in text ranges that tile it in order, each with at most MAX_PAIRS pairs (or one text)
    assert len(ranges) > 10
    assert [start for start, _, _ in ranges] == [0, *(end for _, end, _ in ranges[:-1])] and ranges[-1][1] == len(texts)
    assert all(pairs <= 2000 or end - start == 1 for start, end, pairs in ranges)


def _rows(folder: Path) -> Path:
    """Six image rows; row 5 repeats row 1 exactly, so the double asks it the same questions (same seed, same prompt)."""
    media = folder / "media"
    media.mkdir(exist_ok=True)
    (media / "a.jpg").write_bytes(make_jpeg((64, 48)))
    (media / "b.jpg").write_bytes(make_jpeg((48, 64), color=(20, 120, 200)))
    rows = [
        {"image": "a.jpg", "id": 1},
        {"image": "b.jpg", "id": 2},
        {"image": ["a.jpg", "b.jpg"], "id": 3},
        {"image": "b.jpg", "id": 4},
        {"image": "a.jpg", "id": 1},
        {"image": "a.jpg", "id": 6},
    ]
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return source


def _sharded_run(
    server, folder: Path, source: Path, dedup: NearDuplicateSettings
) -> tuple[list[Shard], dict[str, list[StageManifest]]]:
    """The DAG's tail by hand: generate per shard, dedup across them, quality per shard on what dedup left."""
    plan = plan_shards(Storage(), str(source), rows_per_shard=3)
    stages: dict[str, list[StageManifest]] = {"generate": [], "dedup": [], "quality": []}
    for shard in plan:
        generated = folder / "run" / "generate" / f"shard-{shard.index:05d}.jsonl"
        stages["generate"].append(
            run_job(job_options(server, folder, source, output=str(generated), shard=shard, task_key=f"g{shard.index}"))
        )
    stages["dedup"] = deduplicate_shards(Storage(), stages["generate"], plan, staging=str(folder / "run"), dedup=dedup)
    server.requests.clear()
    for shard in plan:
        deduplicated = folder / "run" / "dedup" / f"shard-{shard.index:05d}.jsonl"
        stages["quality"].append(
            run_job(
                job_options(
                    server,
                    folder,
                    deduplicated,
                    generator="quality",
                    output=str(folder / "run" / "quality" / f"shard-{shard.index:05d}.jsonl"),
                    shard=shard,
                    task_key=f"q{shard.index}",
                    params={"source": "image_qa"},
                )
            )
        )
    return plan, stages


def test_near_duplicates_are_dropped_across_shards_before_any_is_judged_and_every_row_is_accounted_for(
    vlm_server, tmp_path: Path
) -> None:
    source = _rows(tmp_path)
    # the gate rejects the second pair of row 3 (the only row with two images)
    vlm_server.verdicts = ScriptedVerdicts(score=lambda q, a: 1 if q.startswith("question 2: saw 2 image(s)") else 5)
    # the double words the questions of rows with same-sized images alike but for an 8-character digest (3-gram Jaccard
    # up to about 0.85): 0.95 tells them apart, and still catches the exact repeat
    plan, stages = _sharded_run(vlm_server, tmp_path, source, NearDuplicateSettings(near_duplicate_threshold=0.95))
    # the judge saw 10 pairs, 3 calls each (blind answer, agreement, grounding): the 2 near-duplicates cost none
    assert len(vlm_server.requests) == sum(m.requests for m in stages["quality"]) == 30
    output = tmp_path / "run" / "generate.jsonl"
    merged = merge_run(Storage(), stages, output=str(output), plan=plan)

    out, rejected = read_rows(output), read_rows(tmp_path / "run" / "generate.rejected.jsonl")
    # row 5 (second shard) repeats row 1 (first shard): both its pairs are near-duplicates, so the row leaves the dataset
    assert [r["id"] for r in out] == [1, 2, 3, 4, 6]
    assert (merged.rows_in, merged.rows_out, merged.rows_failed, merged.rows_rejected) == (6, 5, 0, 1)
    assert merged.rejections_by_reason == {"near_duplicate": 2, "not_grounded": 1}
    assert (merged.pairs_kept, merged.pairs_rejected, merged.acceptance_rate) == (9, 3, 0.75)
    dupes = [e for e in rejected if e["reason"] == "near_duplicate"]
    assert [(e["stage"], e["line"], e["index"], e["row_rejected"], e["duplicate_of"], e["verdicts"]) for e in dupes] == [
        ("dedup", 5, 0, True, {"line": 1, "index": 0}, None),
        ("dedup", 5, 1, True, {"line": 1, "index": 1}, None),
    ]
    assert [(e["stage"], e["line"], e["index"]) for e in rejected if e["reason"] == "not_grounded"] == [("quality", 3, 1)]
    # every kept pair still has its verdict beside it
    assert all(len(r["qa_pairs"]) == len(r["vqa_provenance"]["quality"]["verdicts"]) for r in out)
    summary = merged.near_duplicates
    assert (
        summary.near_duplicate_threshold,
        summary.pairs_checked,
        summary.duplicates,
        summary.judge_calls_per_pair,
        summary.judge_calls_saved,
    ) == (0.95, 12, 2, 3.0, 6)
    # what the dataset's pairs cost: the generation's calls (one per row) and the judge's, over the 9 pairs kept
    assert merged.requests == 6 + 30 and merged.cost_per_kept_pair.requests == round(36 / 9, 3)
    assert merged.cost_per_kept_pair.prompt_tokens == round(merged.prompt_tokens / 9, 3)
    assert merged.stages["quality"].rejected == str(tmp_path / "run" / "generate.rejected.jsonl")
    assert (
        read_rows(tmp_path / "run" / "quality.errors.jsonl") == [] and read_rows(tmp_path / "run" / "generate.errors.jsonl") == []
    )
    # the dataset's generator, and every stage's errors file (dedup's rows cannot fail: it has none)
    assert merged.generator == "image_qa" and merged.errors == {
        name: str(tmp_path / "run" / f"{name}.errors.jsonl") for name in ("generate", "quality")
    }
    assert (
        merged.stages["dedup"].errors is None and merged.stages["quality"].model == merged.stages["generate"].model == "test-vlm"
    )

    # the preview: the acceptance rate at the top, kept pairs with their score, a row's rejected pair with its reason
    page = render_preview(Storage(), merged, title="t", media_root=str(tmp_path / "media")).decode()
    assert "acceptance rate 75.0%: 9 of 12 pairs kept" in page and "2 near_duplicate" in page and "1 not_grounded" in page
    assert page.count('<span class="score">score 5</span>') == 9
    assert re.search(
        r'<ul class="rejected"><li><span class="reason">not_grounded</span>score 1 · <span class="q">question 2: saw 2 image',
        page,
    )
    assert "<h3>near_duplicate · 2 pairs</h3>" in page and "repeats the pair 0 of line 1" in page


def test_switched_off_every_pair_is_judged(vlm_server, tmp_path: Path) -> None:
    source = _rows(tmp_path)
    vlm_server.verdicts = ScriptedVerdicts(score=lambda q, a: 1 if q.startswith("question 2: saw 2 image(s)") else 5)
    plan, stages = _sharded_run(vlm_server, tmp_path, source, NearDuplicateSettings(remove_near_duplicates=False))
    assert len(vlm_server.requests) == 36
    off = merge_run(Storage(), stages, output=str(tmp_path / "run" / "generate.jsonl"), plan=plan)
    assert (off.rows_out, off.rows_rejected, off.pairs_kept, off.rejections_by_reason) == (6, 0, 11, {"not_grounded": 1})
    assert (
        off.near_duplicates.remove_near_duplicates,
        off.near_duplicates.duplicates,
        off.near_duplicates.judge_calls_saved,
    ) == (False, 0, 0)
    assert len(read_rows(tmp_path / "run" / "generate.rejected.jsonl")) == 1


def test_the_merge_refuses_shards_that_do_not_account_for_every_row(vlm_server, tmp_path: Path) -> None:
    source = _rows(tmp_path)
    plan, stages = _sharded_run(vlm_server, tmp_path, source, NearDuplicateSettings(remove_near_duplicates=False))
    short = [stages["quality"][0].model_copy(update={"rows_out": stages["quality"][0].rows_out - 1}), stages["quality"][1]]
    with pytest.raises(InputError, match="6 input rows but the shards report 5 in the output, 0 in errors files and 0 rejected"):
        merge_run(Storage(), {**stages, "quality": short}, output=str(tmp_path / "run" / "generate.jsonl"), plan=plan)
    assert not (tmp_path / "run" / "generate.jsonl").exists()


def test_a_row_without_pairs_passes_dedup_whole_and_every_row_is_accounted_for(tmp_path: Path) -> None:
    rows = [
        {"id": 1, "qa_pairs": [{"question": "What is red?", "answer": "The ball."}]},
        {"id": 2, "qa_pairs": []},
        {"id": 3, "qa_pairs": [{"question": "What is red?", "answer": "The ball."}]},
    ]
    shard = tmp_path / "generate" / "shard-00000.jsonl"
    shard.parent.mkdir()
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = StageManifest(
        generator="image_qa",
        shard=0,
        input="in.jsonl",
        output=str(shard),
        errors=None,
        rows_in=3,
        rows_out=3,
        rows_failed=0,
        duration_s=0.1,
    )
    plan = [Shard(input="in.jsonl", index=0, first_line=1, rows=3, start=0, end=100)]
    [result] = deduplicate_shards(Storage(), [manifest], plan, staging=str(tmp_path), dedup=NearDuplicateSettings())
    assert [r["id"] for r in read_rows(tmp_path / "dedup" / "shard-00000.jsonl")] == [1, 2]
    assert (result.rows_in, result.rows_out, result.rows_rejected, result.pairs_kept, result.pairs_rejected) == (3, 2, 1, 1, 1)
    assert [
        (e["line"], e["reason"], e["row_rejected"]) for e in read_rows(tmp_path / "dedup" / "shard-00000.rejected.jsonl")
    ] == [(3, "near_duplicate", True)]
