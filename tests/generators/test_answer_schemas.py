"""Every JSON schema the project can send, compiled by the libraries inside vLLM: xgrammar (its default
backend) and llguidance (its fallback and its `guidance` backend). No server needed.

The schemas come from every generator, with its default options and with each option at the ends
of its range (read from the options models, not listed here), so that a new option or a new bound
is covered as soon as it exists.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import annotated_types
import pytest

from testkit import vllm_rules
from vqa_operators.generators import GENERATORS, generator_class
from vqa_operators.generators.answers import PATTERN_MAX_CHARS
from vqa_operators.generators.base import Generator

TAGS = ["<mam>", "[P1]", "x" * 40, "(a|b)*+?.^$-#&~", "名前"]


class _NoServing:
    model_name, concurrency = "none", 1


def _bounds(options_model: type) -> dict[str, tuple[int, int]]:
    """Each integer option's (lowest, highest) allowed value, from the model's own constraints."""
    out = {}
    for name, info in options_model.model_fields.items():
        if info.annotation is not int:
            continue
        low = next((m.ge for m in info.metadata if isinstance(m, annotated_types.Ge)), None)
        high = next((m.le for m in info.metadata if isinstance(m, annotated_types.Le)), None)
        if low is not None and high is not None:
            out[name] = (low, high)
    return out


def _variants(name: str) -> list[dict[str, Any]]:
    """Default options, every integer option at its lowest and at its highest, and (pers_qa) a range of tags; the gate's required source."""
    bounds = _bounds(generator_class(name).Options)
    variants: list[dict[str, Any]] = [{}, {k: lo for k, (lo, _) in bounds.items()}, {k: hi for k, (_, hi) in bounds.items()}]
    if "tag" in generator_class(name).Options.model_fields:
        variants += [{"tag": tag, **extra} for tag, extra in itertools.product(TAGS, variants[:3])]
    if "source" in generator_class(name).Options.model_fields:  # the quality gate: what it judges does not change its schemas
        variants = [{"source": "image_qa", **variant} for variant in variants]
    return variants


def every_schema() -> dict[str, dict[str, Any]]:
    """``generator/variant/model`` -> the JSON schema that generator sends."""
    schemas = {}
    for name in GENERATORS:
        for number, options in enumerate(_variants(name)):
            generator: Generator = generator_class(name)(_NoServing(), options=options)  # type: ignore[arg-type]
            for model in generator.answer_models():
                schemas[f"{name}/{number}/{model.__name__}"] = model.model_json_schema()
    return schemas


SCHEMAS = every_schema()


def test_every_generator_and_its_option_ranges_are_covered() -> None:
    assert {key.split("/")[0] for key in SCHEMAS} == set(GENERATORS)
    assert len({json.dumps(s, sort_keys=True) for s in SCHEMAS.values()}) > 20  # the variants differ, not one schema many times


@pytest.fixture(scope="module")
def xgrammar_compiler() -> Any:
    """xgrammar's grammar compiler with a real tokenizer: the tiny model's (byte-level BPE), as vLLM's engine builds it."""
    import xgrammar

    from scripts.tiny_vlm import tokenizer

    tok = tokenizer()
    return xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)), cache_enabled=False)


@pytest.mark.parametrize("key", sorted(SCHEMAS))
def test_vllm_keeps_the_schema_on_xgrammar_and_xgrammar_compiles_it(key: str, xgrammar_compiler: Any) -> None:
    schema = SCHEMAS[key]
    # no keyword vLLM refuses (uniqueItems, contains) or sends to llguidance instead (pattern with a length bound, allOf ...)
    assert not vllm_rules.xgrammar_unsupported(schema)
    assert vllm_rules.check_schema(schema, "auto") == "xgrammar"
    # what vLLM's engine does before decoding; it fails (HTTP 500) on a bounded repetition over 128 in a pattern
    xgrammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)


@pytest.mark.parametrize("key", sorted(SCHEMAS))
def test_llguidance_accepts_the_schema(key: str) -> None:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMAS[key], defaults={"whitespace_flexible": True})
    assert llguidance.LLMatcher.validate_grammar(grammar, None) == ""


def _strings(schema: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every string-typed subschema, with where it is."""
    found = []
    if isinstance(schema, dict):
        if schema.get("type") == "string":
            found.append((path, schema))
        for key, value in schema.items():
            found += _strings(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found += _strings(value, f"{path}/{i}")
    return found


UNBOUNDED = re.compile(r"(?<!\\)[*+]|\{\d+,\}")


@pytest.mark.parametrize("key", sorted(SCHEMAS))
def test_every_free_text_string_is_bounded(key: str) -> None:
    """So that guided decoding closes every string long before max_tokens, whatever the model writes."""
    for path, string in _strings(SCHEMAS[key]):
        if "const" in string or "enum" in string:
            continue
        if "pattern" in string:
            pattern = string["pattern"]
            assert pattern.startswith("^") and pattern.endswith("$"), path
            repeats = [int(n) for n in re.findall(r"\{\d+,(\d+)\}", pattern)]
            assert not UNBOUNDED.search(re.sub(r"\[[^\]]*\]", "", pattern)) and all(n <= PATTERN_MAX_CHARS for n in repeats), (
                path,
                pattern,
            )
        else:
            assert "maxLength" in string, f"{key}{path} is a string without a bound"
            assert string.get("minLength", 0) >= 1, f"{key}{path} may be empty"


def test_a_schema_that_breaks_the_rules_is_caught() -> None:
    """The checks above can fail: each rule, broken once."""
    assert vllm_rules.xgrammar_unsupported({"type": "array", "items": {"type": "string"}, "uniqueItems": True})
    assert vllm_rules.xgrammar_unsupported({"type": "string", "pattern": "^a.*$", "maxLength": 9})
    with pytest.raises(vllm_rules.Refusal, match=r'Grammar error: Unimplemented keys: \["uniqueItems"\]'):
        vllm_rules.check_schema({"type": "array", "items": {"type": "string"}, "uniqueItems": True})
    with pytest.raises(vllm_rules.Refusal) as info:
        vllm_rules.compiled_grammar(json.dumps({"type": "string", "pattern": f"^a.{{0,{PATTERN_MAX_CHARS + 1}}}$"}))
    assert info.value.status == 500
    assert not UNBOUNDED.search("^<mam>[ .]{0,3}[^\\s].{0,119}$") and UNBOUNDED.search("^<mam>.*$")


@pytest.mark.parametrize("tag", TAGS)
def test_guided_decoding_of_the_tag_pattern_means_what_the_client_checks(tag: str) -> None:
    """What the grammar lets through, the pers_qa check accepts; what it refuses, the check refuses too."""
    from vqa_operators.generators.answers import tagged_answer_model
    from vqa_operators.generators.pers_qa import PersQAGenerator
    from vqa_operators.parsing import ParseError

    schema = json.dumps(tagged_answer_model(tag, 128).model_json_schema())
    generator = PersQAGenerator(_NoServing(), options={"tag": tag})  # type: ignore[arg-type]
    cases = [
        f"{tag} is smiling.",
        f"{tag}, who smiles",
        f"{tag}'s coat is red",
        tag,
        f"{tag} . ,",
        f"x {tag} smiles",
        f"{tag} " + "y" * 200,
    ]
    for text in cases:
        accepted = vllm_rules.grammar_accepts(schema, json.dumps({"answer": text}, ensure_ascii=False))
        try:
            generator.check_answer(generator.answer_model.model_validate({"answer": text}))
            checked = True
        except ParseError:
            checked = False
        assert accepted == checked, (text, accepted, checked)
