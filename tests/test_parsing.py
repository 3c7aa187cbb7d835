"""Parsing model output: real-looking failures, each with a precise reason."""

from __future__ import annotations

import pytest

from vqa_operators.generators.image_qa import qa_set_model
from vqa_operators.parsing import ParseError, extract_json, parse_structured

Answer = qa_set_model("ImageQAAnswer", 2, min_pairs=2)
GOOD = '{"qa_pairs": [{"question": "What colour is the car?", "answer": "Red"}, {"question": "How many people?", "answer": "Two"}]}'


def test_plain_json() -> None:
    assert parse_structured(GOOD, Answer).qa_pairs[0].answer == "Red"


def test_fenced_json_with_prose() -> None:
    text = f"Sure! Here are the pairs:\n```json\n{GOOD}\n```\nLet me know if you need more."
    assert len(parse_structured(text, Answer).qa_pairs) == 2


def test_unterminated_fence() -> None:
    assert extract_json("```json\n{\"a\": 1}\n") == {"a": 1}


def test_prose_around_json_without_fence() -> None:
    assert parse_structured(f"The answer is {GOOD} as requested.", Answer).qa_pairs[1].question == "How many people?"


def test_trailing_commas() -> None:
    text = '{"qa_pairs": [{"question": "Q1?", "answer": "A1",}, {"question": "Q2?", "answer": "A2"},],}'
    assert [p.answer for p in parse_structured(text, Answer).qa_pairs] == ["A1", "A2"]


def test_comma_inside_string_is_kept() -> None:
    assert extract_json('{"a": "x, ]", "b": [1,]}') == {"a": "x, ]", "b": [1]}


def test_escaped_quote_inside_string() -> None:
    assert extract_json(r'{"a": "say \"hi\", }", "b": 2,}') == {"a": 'say "hi", }', "b": 2}


def test_truncated_output_is_named() -> None:
    with pytest.raises(ParseError, match="truncated"):
        extract_json('{"qa_pairs": [{"question": "What is on the ta')


def test_truncated_flag_from_server_is_mentioned() -> None:
    with pytest.raises(ParseError, match="max_tokens"):
        extract_json('{"qa_pairs": [', truncated=True)


def test_wrong_keys() -> None:
    text = '{"qa_pairs": [{"q": "Q1?", "a": "A1"}, {"question": "Q2?", "answer": "A2"}]}'
    with pytest.raises(ParseError, match=r"qa_pairs\.0\.question: Field required"):
        parse_structured(text, Answer)


def test_wrong_count() -> None:
    text = '{"qa_pairs": [{"question": "Q1?", "answer": "A1"}]}'
    with pytest.raises(ParseError, match="at least 2"):
        parse_structured(text, Answer)


def test_empty_answer_rejected() -> None:
    text = '{"qa_pairs": [{"question": "Q1?", "answer": "  "}, {"question": "Q2?", "answer": "A2"}]}'
    with pytest.raises(ParseError, match="answer"):
        parse_structured(text, Answer)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "empty output"), ("Question: what? Answer: that.", "no JSON object"), ('{"a": 1 "b": 2}', "invalid JSON")],
)
def test_unusable(text: str, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        extract_json(text)
