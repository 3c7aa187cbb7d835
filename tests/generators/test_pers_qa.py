"""Personalised QA: the question bank, reproducible choice, the tag rule and row alignment."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer, Reply
from vqa_operators.exceptions import ConfigError, RowError
from vqa_operators.generators.base import row_key
from vqa_operators.generators.pers_qa import CATEGORIES, SUBJECT_TYPES, PersQAGenerator, choose_question, load_question_bank
from vqa_operators.media import MediaReader
from vqa_operators.prompts import load_prompts
from vqa_operators.seed_compat.serving import APIVLMServing_openai
from vqa_operators.storage import Storage
from vqa_operators.worker.rows import run_rows

FORMAT = re.compile(r"^Question: (?P<q>.+?) Answer: (?P<a>.+)$")


def generator(server: OpenAITestServer, root: Path, seed: int | None = 7, **options) -> PersQAGenerator:
    serving = APIVLMServing_openai(api_url=server.base_url, model_name=MODEL, max_workers=8, max_retries=0)
    return PersQAGenerator(serving, options=options, media=MediaReader(Storage(), media_root=str(root)), seed=seed)


def user_text(body: dict) -> str:
    user = [m for m in body["messages"] if m["role"] == "user"][0]
    return user["content"][-1]["text"]


def asked_question(body: dict) -> str:
    return re.search(r"^Question: (.+)$", user_text(body), re.MULTILINE).group(1)


def test_bank_has_twenty_templates_over_every_category_and_kind() -> None:
    bank = load_question_bank(load_prompts("pers_qa"), "<mam>")
    assert len(bank) >= 20
    assert {q.category for q in bank} == set(CATEGORIES)
    for kind in SUBJECT_TYPES:  # people, pets and objects each get their own questions
        assert any(kind in q.kinds for q in bank), kind
    assert sum(q.suits(None) for q in bank) >= 8
    assert all("<mam>" in q.text for q in bank)
    assert len({q.text for q in bank}) == len(bank)


def test_the_tag_is_configurable() -> None:
    bank = load_question_bank(load_prompts("pers_qa"), "[P7]")
    assert all("[P7]" in q.text and "<mam>" not in q.text for q in bank)


def bank_dir(root: Path, text: str) -> str:
    (root / "pers_qa").mkdir(parents=True)
    (root / "common").mkdir()
    (root / "pers_qa" / "questions.j2").write_text(text)
    return str(root)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("appearance | any | What colour is {{ tag }}?\nmood | any | How is {{ tag }}?\n", "line 2: unknown category 'mood'"),
        ("appearance | any | What colour is it?\n", "does not contain the tag"),
        ("appearance | robot | What colour is {{ tag }}?\n", "kinds must be"),
        ("appearance | What colour is {{ tag }}?\n", "expected 'category | kinds | question'"),
        ("appearance | pet | What colour is {{ tag }}?\n", "no question for 'any'"),
    ],
)
def test_a_malformed_bank_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_question_bank(load_prompts("pers_qa", bank_dir(tmp_path, text)), "<mam>")


def test_choice_is_reproducible_and_spread_and_respects_the_subject() -> None:
    bank = load_question_bank(load_prompts("pers_qa"), "<mam>")
    keys = [row_key({"image": [f"img_{i}.jpg"]}) for i in range(300)]
    first = [choose_question(bank, seed=3, key=k, subject=None) for k in keys]
    assert first == [choose_question(bank, seed=3, key=k, subject=None) for k in keys]  # a rerun asks the same
    assert len(set(first)) == sum(q.suits(None) for q in bank)  # every general question gets used
    other_seed = [choose_question(bank, seed=4, key=k, subject=None) for k in keys]
    assert sum(a != b for a, b in zip(first, other_seed, strict=True)) > 150
    pets = {choose_question(bank, seed=3, key=k, subject="pet") for k in keys}
    assert all("any" in q.kinds or "pet" in q.kinds for q in pets)
    assert any("pet" in q.kinds and "any" not in q.kinds for q in pets)


def test_prompt_names_the_main_character_and_the_output_has_the_seed_format(
    vlm_server: OpenAITestServer, images: list[Path]
) -> None:
    gen = generator(vlm_server, images[0].parent)
    row = {"image": [images[0].name]}
    fields, meta = asyncio.run(gen.generate(row))
    body = vlm_server.requests[0]
    system = body["messages"][0]["content"]
    assert "name is <mam>" in system and "must start with <mam>" in system
    schema = body["response_format"]["json_schema"]["schema"]
    # guided decoding enforces the tag, something said after it, and the bound, all in the one pattern
    answer = schema["properties"]["answer"]
    assert answer["pattern"].startswith("^<mam>[") and answer["pattern"].endswith(".{0,119}$") and "maxLength" not in answer
    match = FORMAT.match(fields["pers_qa"])
    assert match, fields["pers_qa"]
    assert match["q"] == asked_question(body) and "<mam>" in match["q"]
    assert match["a"].startswith("<mam> ")
    assert meta["question_category"] in CATEGORIES
    # a rerun of the same row asks the same question
    again, _ = asyncio.run(generator(vlm_server, images[0].parent).generate(row))
    assert FORMAT.match(again["pers_qa"])["q"] == match["q"]


def test_an_answer_without_the_tag_is_repaired(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    vlm_server.enqueue(Reply(content='{"answer": "She is smiling."}'), Reply(content='{"answer": "<mam> is smiling."}'))
    fields, _ = asyncio.run(generator(vlm_server, images[0].parent).generate({"image": images[0].name}))
    assert fields["pers_qa"].endswith("Answer: <mam> is smiling.")
    repair = vlm_server.requests[1]["messages"][-1]["content"]
    assert "must start with '<mam>'" in repair


@pytest.mark.parametrize("second", ['{"answer": "She is smiling."}', '{"answer": "<mam>."}'])
def test_an_answer_still_without_the_tag_goes_to_errors(vlm_server: OpenAITestServer, images: list[Path], second: str) -> None:
    vlm_server.enqueue(Reply(content='{"answer": "She is smiling."}'), Reply(content=second))
    with pytest.raises(RowError) as info:
        asyncio.run(generator(vlm_server, images[0].parent).generate({"image": images[0].name}))
    assert info.value.reason == "answer_missing_tag"
    assert info.value.raw_output == second


def test_multiline_answers_stay_on_one_line(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    vlm_server.enqueue(Reply(content=json.dumps({"answer": "<mam> is\n  standing\tin a park."})))
    fields, _ = asyncio.run(generator(vlm_server, images[0].parent).generate({"image": images[0].name}))
    assert fields["pers_qa"].endswith("Answer: <mam> is standing in a park.")


def test_a_custom_tag_runs_end_to_end(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    fields, _ = asyncio.run(generator(vlm_server, images[0].parent, tag="[P1]").generate({"image": images[0].name}))
    match = FORMAT.match(fields["pers_qa"])
    assert "[P1]" in match["q"] and match["a"].startswith("[P1] ")
    assert vlm_server.requests[0]["response_format"]["json_schema"]["schema"]["properties"]["answer"]["pattern"].startswith(
        r"^\[P1\]["
    )


def test_an_answer_over_the_bound_is_repaired_then_goes_to_errors(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    # a server that ignores the pattern (not vLLM): the client checks the bound itself
    long = json.dumps({"answer": "<mam> " + "is smiling " * 20})
    vlm_server.enqueue(Reply(content=long), Reply(content=long))
    with pytest.raises(RowError, match="the answer has 225 characters; the limit is 128") as info:
        asyncio.run(generator(vlm_server, images[0].parent).generate({"image": images[0].name}))
    assert info.value.reason == "schema_mismatch"


def test_a_bad_subject_type_is_a_row_error(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    with pytest.raises(RowError, match="subject_type") as info:
        asyncio.run(generator(vlm_server, images[0].parent).generate({"image": images[0].name, "subject_type": "robot"}))
    assert info.value.reason == "bad_field" and vlm_server.requests == []


def test_rows_with_several_images_never_misalign(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    """Rows with 1-4 images run concurrently; each row's output pairs its own question with its own answer."""
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(make_jpeg((40 + 10 * i, 40)))
    rows = [{"id": n, "image": [f"{i}.jpg" for i in range(n % 4 + 1)]} for n in range(16)]

    def answer_from_request(body: dict) -> Reply:
        # the answer quotes the question it was asked and counts the images it received
        user = [m for m in body["messages"] if m["role"] == "user"][0]
        count = sum(p["type"] == "image_url" for p in user["content"])
        return Reply(content=json.dumps({"answer": f"<mam> answers [{asked_question(body)}] from {count} image(s)."}))

    vlm_server.responder = answer_from_request
    vlm_server.latency = 0.05
    gen = generator(vlm_server, tmp_path)

    async def run() -> list:
        return [o async for o in run_rows(gen, list(enumerate(rows, start=1)), concurrency=8)]

    outcomes = asyncio.run(run())
    assert vlm_server.peak_concurrency > 1
    assert len(vlm_server.requests) == len(rows)
    for outcome in outcomes:
        match = FORMAT.match(outcome.fields["pers_qa"])
        assert match["a"] == f"<mam> answers [{match['q']}] from {len(outcome.row['image'])} image(s)."
