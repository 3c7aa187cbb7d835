"""What a generator asks of a model server, independent of how the server is reached."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vqa_operators import settings


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters sent with every request."""

    temperature: float = settings.TEMPERATURE
    top_p: float = settings.TOP_P
    max_tokens: int = settings.MAX_TOKENS
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion: OpenAI-format messages and the JSON schema the answer must follow."""

    messages: list[dict[str, Any]]
    schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    seed: int | None = None


@dataclass(frozen=True)
class ChatResult:
    """The model's text with the facts needed to judge it."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class VLMServing(Protocol):
    """The interface every serving backend offers to the generators."""

    model: str
    sampling: SamplingParams
    concurrency: int

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Run one chat completion; raise JobError subclasses for job-level failures, RowError for this request."""
        ...

    async def check(self) -> None:
        """Fail fast (ConfigError / ServerUnavailableError) if the model cannot be used."""
        ...

    async def aclose(self) -> None:
        """Release connections bound to the running event loop."""
        ...
