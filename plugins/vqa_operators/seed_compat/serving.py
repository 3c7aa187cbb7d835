"""The seeds' serving classes, with their keyword names, over the worker's own backends.

``APIVLMServing_openai(api_url, key_name_of_api_key, model_name, max_workers)`` is
``serving.openai_api.OpenAIServing(base_url, api_key_env, model, concurrency)``; what a seed call
does not give comes from the worker's settings (``VQA_BASE_URL``, ``VQA_MODEL``, and the requests
in flight from ``VQA_CONCURRENCY`` or ``VQA_MAX_NUM_SEQS``). ``LocalModelVLMServing_vllm``'s
``hf_model_name_or_path`` and ``vllm_*`` keywords are ``serving.vllm_local.VLLMEngineServing``'s
``model`` and the rest. These names live here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError
from vqa_operators.serving.openai_api import OpenAIServing
from vqa_operators.serving.vllm_local import VLLMEngineServing


class APIVLMServing_openai(OpenAIServing):  # noqa: N801 - the original toolkit's class name, kept for drop-in use
    """The seeds' HTTP serving class: ``OpenAIServing`` under the original toolkit's keyword names."""

    def __init__(
        self,
        api_url: str | None = None,
        key_name_of_api_key: str = settings.API_KEY_ENV,
        model_name: str | None = None,
        max_workers: int | None = None,
        **options: Any,
    ) -> None:
        if api_url is None or model_name is None or max_workers is None:
            env = settings.environment()
            api_url = env.base_url or settings.API_URL if api_url is None else api_url
            if model_name is None and not env.model:
                raise ConfigError("no model name: pass model_name or set VQA_MODEL")
            model_name = env.model if model_name is None else model_name
            max_workers = env.effective_concurrency if max_workers is None else max_workers
        if max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        super().__init__(
            base_url=api_url, model=model_name or "", concurrency=max_workers, api_key_env=key_name_of_api_key, **options
        )

    @property
    def model_name(self) -> str:
        """The seeds' name of ``model``."""
        return self.model


class LocalModelVLMServing_vllm(VLLMEngineServing):  # noqa: N801 - the original toolkit's class name, kept for drop-in use
    """The seeds' in-process vLLM class: ``VLLMEngineServing`` under the original toolkit's keyword names."""

    def __init__(
        self,
        hf_model_name_or_path: str,
        hf_cache_dir: str | None = None,
        hf_local_dir: str | None = None,
        vllm_tensor_parallel_size: int = 1,
        vllm_temperature: float = settings.TEMPERATURE,
        vllm_top_p: float = settings.TOP_P,
        vllm_max_tokens: int = settings.MAX_TOKENS,
        vllm_max_model_len: int | None = None,
        vllm_gpu_memory_utilization: float = settings.VLLM_GPU_MEMORY_UTILIZATION,
        vllm_seed: int | None = None,
        *,
        concurrency: int = settings.MAX_NUM_SEQS,
        max_images_per_prompt: int = settings.MAX_IMAGES_PER_PROMPT,
        engine_args: dict[str, Any] | None = None,
        engine: Any | None = None,
    ) -> None:
        if not hf_model_name_or_path:
            raise ConfigError("hf_model_name_or_path is required")
        super().__init__(
            hf_model_name_or_path,
            download_dir=hf_local_dir or hf_cache_dir,
            tensor_parallel_size=vllm_tensor_parallel_size,
            temperature=vllm_temperature,
            top_p=vllm_top_p,
            max_tokens=vllm_max_tokens,
            max_model_len=vllm_max_model_len,
            gpu_memory_utilization=vllm_gpu_memory_utilization,
            seed=vllm_seed,
            concurrency=concurrency,
            max_images_per_prompt=max_images_per_prompt,
            engine_args=engine_args,
            engine=engine,
        )

    @property
    def model_name(self) -> str:
        """The seeds' name of ``model``."""
        return self.model
