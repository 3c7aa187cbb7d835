"""``OpenAIServing``: an async client for OpenAI-compatible servers such as ``vllm serve``.

Faults, and what becomes of them:

- 429: wait as long as ``Retry-After`` (or ``retry-after-ms``) says, up to ``MAX_RETRY_AFTER_S``,
  then try again; 408/409/5xx, timeouts and dropped connections: exponential backoff with jitter.
  Each request has at most ``max_retries`` retries; what still fails is a job-level
  ``ServerUnavailableError`` (Airflow retries the task), never a row failure.
- Consecutive failures are also counted across all requests. ``max_consecutive_failures`` of them
  in a row, with no success in between, mean the server is down: every request stops at once and
  the job fails fast instead of each request exhausting its own retries.
- 400/413/422 reject this one request: a RowError (``request_rejected``). 401/403/404 are
  configuration errors.

The openai client's own retries are off (``max_retries=0``), so that this is the one retry policy.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError, Reason, RowError, ServerUnavailableError
from vqa_operators.serving.base import ChatRequest, ChatResult, SamplingParams

MAX_RETRY_AFTER_S = 60.0
MAX_BACKOFF_S = 30.0
RETRY_BASE_DELAY_S = 0.5  # the first backoff is 0.25-0.5 s, then it doubles
T = TypeVar("T")


def redact_url(url: str) -> str:
    """``url`` without any user:password part, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else "")))


def retry_after(headers: Any) -> float | None:
    """Seconds a ``retry-after-ms`` / ``Retry-After`` (seconds or HTTP date) header asks for, or None."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Outage:
    """Consecutive failures across every request of a run; ``limit`` of them in a row trip it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.tripped: str | None = None

    def success(self) -> None:
        self.count = 0

    def failure(self, what: str) -> None:
        self.count += 1
        if self.count >= self.limit and self.tripped is None:
            self.tripped = f"{self.count} consecutive failures, the last: {what}"


class OpenAIServing:
    """Chat completions over HTTP with bounded concurrency, structured output and sampling parameters.

    ``base_url``: the server's OpenAI-compatible /v1 URL; ``model``: the served model's name; ``concurrency``: requests in
    flight. The key: ``api_key``, else the variable ``api_key_env`` names, else none. The seeds' class with their names is
    ``seed_compat.serving.APIVLMServing_openai``.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        concurrency: int,
        api_key: str | None = None,
        api_key_env: str = settings.API_KEY_ENV,
        temperature: float = settings.TEMPERATURE,
        top_p: float = settings.TOP_P,
        max_tokens: int = settings.MAX_TOKENS,
        seed: int | None = None,
        timeout: float = settings.REQUEST_TIMEOUT_S,
        max_retries: int = settings.MAX_RETRIES,
        max_consecutive_failures: int = settings.MAX_CONSECUTIVE_FAILURES,
        retry_base_delay: float | None = None,
        structured_output: bool = True,
    ) -> None:
        if not base_url:
            raise ConfigError("the model server's URL is empty: set VQA_BASE_URL or the vqa_vlm connection's host")
        if not model:
            raise ConfigError("no model name: pass the model or set VQA_MODEL")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_base_delay = RETRY_BASE_DELAY_S if retry_base_delay is None else retry_base_delay
        self.structured_output = structured_output
        # an API key is optional for a local vLLM server; "EMPTY" is what vLLM's docs use
        self._api_key = api_key or settings.variable(api_key_env) or "EMPTY"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._concurrency: asyncio.Semaphore | None = None
        self._outage = _Outage(max_consecutive_failures)

    def __repr__(self) -> str:  # never show the key
        return (
            f"{type(self).__name__}(base_url={redact_url(self.base_url)!r}, model={self.model!r}, concurrency={self.concurrency})"
        )

    def _bound(self) -> tuple[Any, asyncio.Semaphore]:
        # httpx connections and semaphores belong to one event loop; the seed API runs one loop per run()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, max_retries=0, timeout=self.timeout)
            self._concurrency = asyncio.Semaphore(self.concurrency)
            self._loop = loop
        assert self._concurrency is not None
        return self._client, self._concurrency

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body POSTed to ``/chat/completions`` for ``request``."""
        body: dict[str, Any] = {
            "model": self.model,
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

    async def _call(self, send: Callable[[Any], Awaitable[T]], *, not_found: str | None = None) -> T:
        """``send(client)`` under the concurrency bound, with the retry policy of the module docstring.

        ``not_found``: what an HTTP 404 means for this call (default: the model is not served).
        """
        import openai

        client, slots = self._bound()
        where = redact_url(self.base_url)
        for attempt in range(self.max_retries + 1):
            try:
                async with slots:
                    if self._outage.tripped:  # checked once a slot is free: no request is sent after the trip
                        raise ServerUnavailableError(f"model server at {where} is down: {self._outage.tripped}")
                    result = await send(client)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise ConfigError(f"model server refused the API key: HTTP {exc.status_code}") from None
            except openai.NotFoundError as exc:
                raise ConfigError(f"{not_found or f'model server has no model {self.model!r}'}: {_message(exc)}") from None
            except openai.APIStatusError as exc:
                if exc.status_code in (400, 413, 422):
                    raise RowError(Reason.REQUEST_REJECTED, f"HTTP {exc.status_code}: {_message(exc)}") from None
                if exc.status_code not in (408, 409, 429) and exc.status_code < 500:
                    raise ConfigError(f"model server at {where} answered HTTP {exc.status_code}: {_message(exc)}") from None
                what, state = f"HTTP {exc.status_code}", "still failing"
                wait = retry_after(exc.response.headers) if exc.status_code == 429 else None
                if exc.status_code != 429:  # a 429 is a busy server, not a down one
                    self._outage.failure(what)
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                what, state, wait = type(exc).__name__, "unreachable", None
                self._outage.failure(what)
            else:
                self._outage.success()
                return result
            if attempt == self.max_retries:
                break
            if wait is None:  # exponential backoff with equal jitter
                ceiling = min(MAX_BACKOFF_S, self.retry_base_delay * 2**attempt)
                wait = ceiling / 2 + random.uniform(0, ceiling / 2)
            await asyncio.sleep(min(wait, MAX_RETRY_AFTER_S))
        if self._outage.tripped:
            raise ServerUnavailableError(f"model server at {where} is down: {self._outage.tripped}")
        raise ServerUnavailableError(f"model server at {where} {state} after {self.max_retries} retries: {what}")

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Send one request; map what the retries could not fix to job- or row-level errors."""
        from openai.types.chat import ChatCompletion

        body = self.request_body(request)
        # ``client.post`` sends the body as it is: ``chat.completions.create`` first walks every
        # message and the JSON schema in Python on the event loop (~10 ms a request, measured),
        # which starves a busy server of requests
        response = await self._call(lambda client: client.post("/chat/completions", body=body, cast_to=ChatCompletion))
        if not response.choices:
            raise RowError(Reason.EMPTY_RESPONSE, "the server returned no choices")
        choice = response.choices[0]
        usage = response.usage
        return ChatResult(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )

    async def transcribe(self, audio: bytes, *, filename: str = "clip.wav") -> str:
        """Speech to text: ``audio`` (a WAV file's bytes) POSTed to ``/audio/transcriptions``, as vLLM serves Whisper models.

        A server without that endpoint (a model that is not speech-to-text) is a ConfigError.
        """
        from openai.types.audio import Transcription

        where = redact_url(self.base_url)

        async def send(client: Any) -> Transcription:
            # the client's files argument is (name, bytes, content type); temperature 0: the same audio gives the same text
            return await client.audio.transcriptions.create(
                model=self.model, file=(filename, audio, "audio/wav"), response_format="json", temperature=0.0
            )

        result = await self._call(
            send, not_found=f"{where} has no /audio/transcriptions for {self.model!r} (is it serving a speech-to-text model?)"
        )
        return result.text.strip()

    async def check(self) -> None:
        """Fail fast if the server is unreachable or does not serve ``model``."""

        async def served(client: Any) -> list[str]:
            return [m.id async for m in client.models.list()]

        models = await self._call(served)
        if self.model not in models:
            raise ConfigError(f"model {self.model!r} is not served at {redact_url(self.base_url)}; it serves {models}")

    async def aclose(self) -> None:
        """Close the HTTP client of the current event loop."""
        if self._client is not None:
            await self._client.close()
        self._client, self._loop, self._concurrency = None, None, None
        self._outage = _Outage(self._outage.limit)


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
        if isinstance(inner, dict) and isinstance(inner.get("detail"), str):  # FastAPI's own answers (an unknown route)
            return inner["detail"][:300]
    return str(exc)[:300]
