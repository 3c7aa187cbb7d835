"""The HTTP client against the OpenAI-compatible test double: request shape, retries, error mapping."""

from __future__ import annotations

import asyncio
import time

import pytest

from testkit.data import MODEL
from testkit.openai_server import OpenAITestServer, Reply
from vqa_operators.exceptions import ConfigError, RowError, ServerUnavailableError
from vqa_operators.seed_compat.serving import APIVLMServing_openai
from vqa_operators.serving.base import ChatRequest
from vqa_operators.serving.openai_api import OpenAIServing

SCHEMA = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"], "additionalProperties": False}
REQUEST = ChatRequest(messages=[{"role": "user", "content": "hi"}], schema=SCHEMA, schema_name="X", seed=7)


def serving(server: OpenAITestServer, **kwargs) -> OpenAIServing:
    kwargs.setdefault("max_retries", 3)
    return OpenAIServing(
        base_url=server.base_url, model=kwargs.pop("model", MODEL), concurrency=kwargs.pop("concurrency", 8), **kwargs
    )


def test_sends_sampling_parameters_and_json_schema(vlm_server: OpenAITestServer) -> None:
    client = serving(vlm_server, temperature=0.2, top_p=0.8, max_tokens=333)
    result = asyncio.run(client.chat(REQUEST))
    body = vlm_server.requests[-1]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.2, 0.8, 333, 7)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert result.text.startswith('{"x": ') and result.finish_reason == "stop"
    assert result.completion_tokens > 0


def test_retries_5xx_and_429_then_succeeds(vlm_server: OpenAITestServer) -> None:
    vlm_server.enqueue(Reply(status=503), Reply(status=429, headers={"Retry-After": "0"}), Reply(status=500))
    result = asyncio.run(serving(vlm_server).chat(REQUEST))
    assert result.text
    assert len(vlm_server.requests) == 4


def test_retries_a_dropped_connection(vlm_server: OpenAITestServer) -> None:
    vlm_server.enqueue(Reply(drop=True))
    assert asyncio.run(serving(vlm_server).chat(REQUEST)).text
    assert len(vlm_server.requests) == 2


def test_honours_retry_after(vlm_server: OpenAITestServer) -> None:
    vlm_server.enqueue(Reply(status=429, headers={"Retry-After": "1"}))
    start = time.monotonic()
    asyncio.run(serving(vlm_server).chat(REQUEST))
    assert time.monotonic() - start >= 0.95


def test_persistent_5xx_is_a_job_error(vlm_server: OpenAITestServer) -> None:
    vlm_server.enqueue(*[Reply(status=502)] * 3)
    with pytest.raises(ServerUnavailableError, match="HTTP 502"):
        asyncio.run(serving(vlm_server, max_retries=2).chat(REQUEST))
    assert len(vlm_server.requests) == 3


def test_unreachable_server_is_a_job_error() -> None:
    client = OpenAIServing(base_url="http://127.0.0.1:9/v1", model=MODEL, concurrency=8, max_retries=1)
    with pytest.raises(ServerUnavailableError, match="unreachable"):
        asyncio.run(client.chat(REQUEST))


def test_unknown_model_is_a_config_error(vlm_server: OpenAITestServer) -> None:
    with pytest.raises(ConfigError, match="no model 'other'"):
        asyncio.run(serving(vlm_server, model="other").chat(REQUEST))
    with pytest.raises(ConfigError, match="not served"):
        asyncio.run(serving(vlm_server, model="other").check())


def test_request_rejected_is_a_row_error(vlm_server: OpenAITestServer) -> None:
    bad = ChatRequest(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}])
    with pytest.raises(RowError, match="HTTP 400: The URL must be either a HTTP, data or file URL") as info:
        asyncio.run(serving(vlm_server).chat(bad))
    assert info.value.reason == "request_rejected"


def test_malformed_schema_is_rejected_by_the_double(vlm_server: OpenAITestServer) -> None:
    bad = ChatRequest(messages=[{"role": "user", "content": "x"}], schema={"type": "objekt"})
    with pytest.raises(RowError, match="HTTP 400: Grammar error: Invalid type: objekt"):
        asyncio.run(serving(vlm_server).chat(bad))


def test_concurrency_is_bounded(vlm_server: OpenAITestServer) -> None:
    vlm_server.latency = 0.1
    client = serving(vlm_server, concurrency=4)

    async def burst() -> None:
        await asyncio.gather(*(client.chat(REQUEST) for _ in range(16)))

    asyncio.run(burst())
    assert vlm_server.peak_concurrency == 4


def test_api_key_is_read_from_the_named_variable_and_not_shown(vlm_server: OpenAITestServer, monkeypatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    client = APIVLMServing_openai(api_url=vlm_server.base_url, key_name_of_api_key="MY_KEY", model_name=MODEL, max_workers=2)
    assert "sk-very-secret" not in repr(client)
    asyncio.run(client.chat(REQUEST))
