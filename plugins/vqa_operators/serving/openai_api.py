"""``APIVLMServing_openai``: an async client for OpenAI-compatible servers such as ``vllm serve``.

Retries are the openai client's own: exponential backoff with jitter on 408/409/429/5xx,
timeouts and dropped connections, honouring ``Retry-After``. What is still failing after them is
a job-level error (the server is unavailable), except a 400/422 answer about this one request.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from vqa_operators.exceptions import ConfigError, RowError, ServerUnavailableError
from vqa_operators.serving.base import ChatRequest, ChatResult, SamplingParams

DEFAULT_API_KEY_ENV = "VQA_API_KEY"


class APIVLMServing_openai:  # noqa: N801 - the original toolkit's class name, kept for drop-in use
    """Chat completions over HTTP with bounded concurrency, structured output and sampling parameters."""

    def __init__(
        self,
        api_url: str = "http://localhost:8000/v1",
        key_name_of_api_key: str = DEFAULT_API_KEY_ENV,
        model_name: str = "Qwen/Qwen2.5-VL-3B-Instruct",
        max_workers: int = 64,
        *,
        api_key: str | None = None,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_tokens: int = 1024,
        seed: int | None = None,
        timeout: float = 300.0,
        max_retries: int = 5,
        structured_output: bool = True,
    ) -> None:
        if not api_url:
            raise ConfigError("api_url is empty: set VQA_BASE_URL or the vqa_vlm connection's host")
        if max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        self.api_url = api_url.rstrip("/")
        self.model_name = model_name
        self.max_concurrency = max_workers
        self.sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        self.timeout = timeout
        self.max_retries = max_retries
        self.structured_output = structured_output
        # an API key is optional for a local vLLM server; "EMPTY" is what vLLM's docs use
        self._api_key = api_key or os.environ.get(key_name_of_api_key) or "EMPTY"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None

    def __repr__(self) -> str:  # never show the key
        return f"APIVLMServing_openai(api_url={self.api_url!r}, model_name={self.model_name!r}, max_workers={self.max_concurrency})"

    def _bound(self) -> tuple[Any, asyncio.Semaphore]:
        # httpx connections and semaphores belong to one event loop; the seed API runs one loop per run()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(
                base_url=self.api_url, api_key=self._api_key, max_retries=self.max_retries, timeout=self.timeout
            )
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        assert self._slots is not None
        return self._client, self._slots

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The keyword arguments sent to ``chat.completions.create`` for ``request``."""
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": request.messages,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_tokens,
        }
        seed = request.seed if request.seed is not None else self.sampling.seed
        if seed is not None:
            body["seed"] = seed
        if request.schema is not None and self.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.schema, "strict": True},
            }
        return body

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Send one request; map what the retries could not fix to job- or row-level errors."""
        import openai

        client, slots = self._bound()
        async with slots:
            try:
                response = await client.chat.completions.create(**self.request_body(request))
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise ConfigError(f"model server refused the API key: HTTP {exc.status_code}") from None
            except openai.NotFoundError as exc:
                raise ConfigError(f"model server has no model {self.model_name!r}: {_message(exc)}") from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                raise RowError("request_rejected", f"HTTP {exc.status_code}: {_message(exc)}") from None
            except openai.APIStatusError as exc:
                raise ServerUnavailableError(
                    f"model server at {self.api_url} still failing after {self.max_retries} retries: HTTP {exc.status_code}"
                ) from None
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                raise ServerUnavailableError(
                    f"model server at {self.api_url} unreachable after {self.max_retries} retries: {type(exc).__name__}"
                ) from None
        if not response.choices:
            raise RowError("empty_response", "the server returned no choices")
        choice = response.choices[0]
        usage = response.usage
        return ChatResult(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )

    async def check(self) -> None:
        """Fail fast if the server is unreachable or does not serve ``model_name``."""
        import openai

        client, _ = self._bound()
        try:
            served = [m.id async for m in client.models.list()]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ConfigError(f"model server refused the API key: HTTP {exc.status_code}") from None
        except (openai.APIConnectionError, openai.APITimeoutError, openai.APIStatusError) as exc:
            raise ServerUnavailableError(f"model server at {self.api_url} unreachable: {type(exc).__name__}") from None
        if self.model_name not in served:
            raise ConfigError(f"model {self.model_name!r} is not served at {self.api_url}; it serves {served}")

    async def aclose(self) -> None:
        """Close the HTTP client of the current event loop."""
        if self._client is not None:
            await self._client.close()
        self._client, self._loop, self._slots = None, None, None


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(exc)[:300]
