"""The image QA generator: multi-image prompts, configurable pair count, repair, and per-row errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from testkit.data import MODEL
from testkit.openai_server import OpenAITestServer, Reply
from vqa_operators.exceptions import ConfigError, RowError, StorageError
from vqa_operators.generators.image_qa import ImageQAGenerator
from vqa_operators.media import MediaReader
from vqa_operators.seed_compat.serving import APIVLMServing_openai
from vqa_operators.storage import Storage


def generator(server: OpenAITestServer, root: Path, **options) -> ImageQAGenerator:
    serving = APIVLMServing_openai(api_url=server.base_url, model_name=MODEL, max_workers=4, max_retries=0)
    return ImageQAGenerator(serving, options=options, media=MediaReader(Storage(), media_root=str(root)), seed=11)


def image_parts(body: dict) -> list[dict]:
    user = [m for m in body["messages"] if m["role"] == "user"][0]
    return [p for p in user["content"] if p["type"] == "image_url"]


def test_several_images_go_in_one_prompt(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    gen = generator(vlm_server, images[0].parent, pairs_per_row=4)
    fields, meta = asyncio.run(gen.generate({"image": [p.name for p in images]}))
    assert len(vlm_server.requests) == 1
    assert len(image_parts(vlm_server.requests[0])) == 3
    pairs = fields["qa_pairs"]
    assert len(pairs) == 4 and all(set(p) == {"question", "answer"} for p in pairs)
    # the double states what it received: three images, in order, at their sizes
    assert "saw 3 image(s) 64x48,80x80,40x100" in pairs[0]["answer"]
    assert [m["source"] for m in meta["images"]] == [p.name for p in images]
    schema = vlm_server.requests[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["qa_pairs"]["minItems"] == 4 == schema["properties"]["qa_pairs"]["maxItems"]


def test_single_string_counts_as_one_image(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    fields, _ = asyncio.run(generator(vlm_server, images[0].parent).generate({"image": images[0].name}))
    assert len(image_parts(vlm_server.requests[0])) == 1
    assert len(fields["qa_pairs"]) == 3


def test_prompt_comes_from_the_template(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    gen = generator(vlm_server, images[0].parent, pairs_per_row=2)
    asyncio.run(gen.generate({"image": [images[0].name, images[1].name]}))
    user = [m for m in vlm_server.requests[0]["messages"] if m["role"] == "user"][0]
    text = user["content"][-1]["text"]
    assert "Write exactly 2 diverse question-answer pairs" in text and "compares the images" in text
    assert len(gen.prompts.sha256) == 64


def test_unusable_output_is_repaired_once(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    good = json.dumps({"qa_pairs": [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(3)]})
    vlm_server.enqueue(Reply(content="Question: what is it? Answer: a dog."), Reply(content=f"```json\n{good}\n```"))
    gen = generator(vlm_server, images[0].parent)
    fields, _ = asyncio.run(gen.generate({"image": images[0].name}))
    assert [p["answer"] for p in fields["qa_pairs"]] == ["A0", "A1", "A2"]
    repair = vlm_server.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": "Question: what is it? Answer: a dog."}
    assert "no JSON object" in repair[-1]["content"]
    assert gen.usage.repairs == 1 and gen.usage.requests == 2


def test_still_unusable_after_repair_is_a_row_error(vlm_server: OpenAITestServer, images: list[Path]) -> None:
    vlm_server.enqueue(Reply(content='{"qa_pairs": [', finish_reason="length"), Reply(content='{"qa_pairs": []}'))
    with pytest.raises(RowError, match="after one repair") as info:
        asyncio.run(generator(vlm_server, images[0].parent).generate({"image": images[0].name}))
    assert info.value.reason == "schema_mismatch"
    assert info.value.raw_output == '{"qa_pairs": []}'
    assert "max_tokens" in vlm_server.requests[1]["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({}, "missing_field"),
        ({"image": None}, "missing_field"),
        ({"image": 3}, "bad_field"),
        ({"image": []}, "bad_field"),
        ({"image": ["missing.jpg"]}, "image_not_found"),
    ],
)
def test_bad_rows_raise_row_errors(vlm_server: OpenAITestServer, tmp_path: Path, row: dict, reason: str) -> None:
    with pytest.raises(RowError) as info:
        asyncio.run(generator(vlm_server, tmp_path).generate(row))
    assert info.value.reason == reason
    assert vlm_server.requests == []  # no model call for bad input


def test_options_are_validated(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pairs_per_row"):
        generator(vlm_server, tmp_path, pairs_per_row=0)
    with pytest.raises(ConfigError, match="Extra inputs"):
        generator(vlm_server, tmp_path, pairs=3)


def _client_error(code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")


class RaisingS3:
    """An S3 client stand-in whose get_object raises ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def get_object(self, **_: object) -> dict:
        raise self.exc


class RaisingLocalStorage(Storage):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def read_bytes(self, uri: str) -> bytes:
        raise self.exc


@pytest.mark.parametrize(
    ("storage", "root", "reason", "detail"),
    [
        (RaisingLocalStorage(PermissionError(13, "Permission denied")), "/media", "image_unreadable", "Permission denied"),
        (Storage(s3_client=RaisingS3(_client_error("AccessDenied"))), "s3://b/", "image_unreadable", "AccessDenied"),
        (Storage(s3_client=RaisingS3(_client_error("NoSuchKey"))), "s3://b/", "image_not_found", "NoSuchKey"),
        (Storage(s3_client=RaisingS3(_client_error("NoSuchKey"))), "s3://bucket-only", "bad_field", "not an s3://bucket/key URI"),
    ],
    ids=["local-permission", "s3-access-denied", "s3-missing", "malformed-s3-uri"],
)
def test_unreadable_images_are_row_errors(
    vlm_server: OpenAITestServer, storage: Storage, root: str, reason: str, detail: str
) -> None:
    serving = APIVLMServing_openai(api_url=vlm_server.base_url, model_name=MODEL, max_retries=0)
    gen = ImageQAGenerator(serving, media=MediaReader(storage, media_root=root))
    image = "s3://bucket-only" if root == "s3://bucket-only" else "a.jpg"
    with pytest.raises(RowError, match=detail) as info:
        asyncio.run(gen.generate({"image": image}))
    assert info.value.reason == reason
    assert vlm_server.requests == []


def test_unreachable_s3_for_an_image_fails_the_job(vlm_server: OpenAITestServer) -> None:
    from botocore.exceptions import EndpointConnectionError

    serving = APIVLMServing_openai(api_url=vlm_server.base_url, model_name=MODEL, max_retries=0)
    storage = Storage(s3_client=RaisingS3(EndpointConnectionError(endpoint_url="http://127.0.0.1:9")))
    gen = ImageQAGenerator(serving, media=MediaReader(storage, media_root="s3://b/"))
    with pytest.raises(StorageError, match="cannot read s3://b/a.jpg: EndpointConnectionError"):
        asyncio.run(gen.generate({"image": "a.jpg"}))
