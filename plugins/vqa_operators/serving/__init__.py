"""Model serving: the request/response types and the two backends (HTTP to vLLM, vLLM in-process)."""

from vqa_operators.serving.base import ChatRequest, ChatResult, SamplingParams, VLMServing

__all__ = ["ChatRequest", "ChatResult", "SamplingParams", "VLMServing"]
