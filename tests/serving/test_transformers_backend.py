"""The CPU transformers backend, against the tiny random-weight Idefics3 built offline (scripts/tiny_vlm.py).

Loading, chat templating, image preprocessing and generation are real, and so is guided
decoding (xgrammar's logits processor): the model writes noise, but noise that follows each
request's JSON schema, so rows come out.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from testkit.data import make_jpeg, read_rows
from vqa_operators.exceptions import ConfigError
from vqa_operators.media import prepare_image
from vqa_operators.serving.base import ChatRequest
from vqa_operators.serving.transformers_local import TransformersServing, to_processor_messages
from vqa_operators.worker import JobOptions, run_job
from vqa_operators.worker.cli import main


def image_message(*sizes: tuple[int, int]) -> list[dict]:
    parts = [
        {"type": "image_url", "image_url": {"url": prepare_image(make_jpeg(size), source=f"{i}.jpg").data_url}}
        for i, size in enumerate(sizes)
    ]
    return [
        {"role": "system", "content": "You write QA pairs."},
        {"role": "user", "content": [*parts, {"type": "text", "text": "Two pairs, as JSON."}]},
    ]


def test_openai_messages_become_template_parts_and_images_in_order() -> None:
    messages, images = to_processor_messages(image_message((64, 48), (30, 90)))
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "You write QA pairs."}]}
    assert [p["type"] for p in messages[1]["content"]] == ["image", "image", "text"]
    assert [img.size for img in images] == [(64, 48), (30, 90)]


def test_generation_is_real_and_seeded(tiny_idefics3: Path) -> None:
    serving = TransformersServing(str(tiny_idefics3), max_tokens=24, temperature=0.7)
    request = ChatRequest(messages=image_message((64, 48), (30, 90)), seed=11)

    async def twice() -> tuple:
        await serving.check()
        return (
            await serving.chat(request),
            await serving.chat(request),
            await serving.chat(ChatRequest(messages=request.messages, seed=12)),
        )

    first, again, other = asyncio.run(twice())
    # 2 images x 4 patch tokens each went through the processor, plus the templated text
    assert first.prompt_tokens > 8 + len("You write QA pairs.") // 8
    assert 1 <= first.completion_tokens <= 24 and first.finish_reason in {"stop", "length"}
    assert first.text == again.text  # same seed, same sample
    assert other.text != first.text or other.completion_tokens != first.completion_tokens


def test_guided_decoding_gets_a_random_models_rows_out(tiny_idefics3: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.jpg").write_bytes(make_jpeg((64, 48)))
    (media / "broken.jpg").write_bytes(b"not an image")
    rows = [{"id": 0, "image": "a.jpg"}, {"id": 1, "image": ["a.jpg", "a.jpg"]}, {"id": 2, "image": "broken.jpg"}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = JobOptions(
        generator="image_qa",
        backend="transformers",
        model=str(tiny_idefics3),
        input=str(source),
        output=str(tmp_path / "out.jsonl"),
        media_root=str(media),
        seed=1,
        max_tokens=512,
        params={"pairs_per_row": 2, "max_question_chars": 40, "max_answer_chars": 60},
    )
    manifest = run_job(opts)
    assert (manifest.rows_in, manifest.rows_out, manifest.rows_failed) == (3, 2, 1)
    out = read_rows(tmp_path / "out.jsonl")
    for row in out:  # noise, but noise in the schema's shape and bounds
        assert len(row["qa_pairs"]) == 2 and all(
            0 < len(p["question"]) <= 40 and 0 < len(p["answer"]) <= 60 for p in row["qa_pairs"]
        )
    assert [e["reason"] for e in read_rows(tmp_path / "out.errors.jsonl")] == ["bad_image"]
    # each image row asked once, no repair needed; the broken image never reached the model
    assert manifest.requests == 2 and manifest.repairs == 0
    assert manifest.prompt_tokens > 0 and manifest.completion_tokens > 0
    assert manifest.model == str(tiny_idefics3)


def test_without_guided_decoding_the_same_model_writes_unusable_text(tiny_idefics3: Path) -> None:
    """The control: the schema is what makes the answers parse, not luck."""
    from vqa_operators.generators.answers import TextLimits, qa_set_model
    from vqa_operators.parsing import ParseError, parse_structured

    serving = TransformersServing(str(tiny_idefics3), max_tokens=512, seed=1)
    model = qa_set_model("A", 2, TextLimits(40, 60), min_pairs=2)
    free = asyncio.run(serving.chat(ChatRequest(messages=image_message((64, 48)), seed=3)))
    guided = asyncio.run(serving.chat(ChatRequest(messages=image_message((64, 48)), seed=3, schema=model.model_json_schema())))
    with pytest.raises(ParseError):
        parse_structured(free.text, model)
    assert len(parse_structured(guided.text, model).qa_pairs) == 2


def test_cli_backend_flag_and_a_missing_model_folder_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"image": "a.jpg"}) + "\n")
    code = main(
        [
            "run",
            "image_qa",
            "--backend",
            "transformers",
            "--model",
            str(tmp_path / "no-such-model"),
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
    )
    assert code != 0
    assert "ConfigError: cannot load model" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_backend_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQA_BACKEND", "transformers")
    assert JobOptions(generator="image_qa", input="/in.jsonl", output="/out.jsonl").backend == "transformers"
    monkeypatch.setenv("VQA_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="backend"):
        JobOptions(generator="image_qa", input="/in.jsonl", output="/out.jsonl")


def test_a_model_folder_without_a_chat_template_is_a_config_error(tiny_idefics3: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_idefics3, tmp_path / "no-template"))
    (copy / "chat_template.jinja").unlink()
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((copy / name).read_text())
        config.pop("chat_template", None)
        (copy / name).write_text(json.dumps(config))
    serving = TransformersServing(str(copy))
    with pytest.raises(ConfigError, match="no chat template"):
        asyncio.run(serving.check())
