"""Which model server a run uses: an OpenAI-compatible server (vLLM), vLLM started here, or transformers on the CPU."""

from __future__ import annotations

import contextlib

from vqa_operators.exceptions import ConfigError
from vqa_operators.serving.base import VLMServing
from vqa_operators.worker.options import JobOptions


def open_serving(opts: JobOptions, stack: contextlib.ExitStack) -> VLMServing:
    """The serving object ``opts`` asks for; a server it starts (``--serve-vllm``) is stopped when ``stack`` closes.

    Its completion token limit: the run's ``max_tokens``, else the generator's own (``Generator.max_tokens``).
    """
    from vqa_operators.generators import generator_class

    max_tokens = opts.max_tokens if opts.max_tokens is not None else generator_class(opts.generator).max_tokens
    if opts.backend == "transformers":
        from vqa_operators.serving.transformers_local import DEFAULT_CPU_MODEL, TransformersServing

        return TransformersServing(
            opts.model or DEFAULT_CPU_MODEL, temperature=opts.temperature, top_p=opts.top_p, max_tokens=max_tokens, seed=opts.seed
        )
    if not opts.model:
        raise ConfigError("no model name: pass --model or set VQA_MODEL (or the vqa_vlm connection's extra.model)")
    base_url = opts.base_url
    if opts.serve_vllm:
        from vqa_operators.serving.vllm_server import serve_vllm

        base_url = stack.enter_context(serve_vllm(opts.model, max_num_seqs=opts.max_num_seqs))
    if not base_url:
        raise ConfigError("no model server: pass --base-url or set VQA_BASE_URL (an OpenAI-compatible /v1 URL, e.g. vllm serve)")
    from vqa_operators.serving.openai_api import OpenAIServing

    return OpenAIServing(
        base_url=base_url,
        model=opts.model,
        concurrency=opts.effective_concurrency,
        api_key=opts.api_key.get_secret_value() if opts.api_key else None,
        temperature=opts.temperature,
        top_p=opts.top_p,
        max_tokens=max_tokens,
        seed=opts.seed,
        timeout=opts.request_timeout,
        max_retries=opts.max_retries,
        max_consecutive_failures=opts.max_consecutive_failures,
    )
