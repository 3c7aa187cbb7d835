"""``TransformersServing``: a vision-language model run by Hugging Face transformers on this machine's CPU.

For laptops where vLLM's CPU build does not install (macOS, say): no GPU, no model server.
``torch``, ``transformers`` and ``xgrammar`` are imported on first use only, so nothing else pays
for them. The model is a Hub id (fetched into the Hub cache on first use) or a local folder
(``VQA_MODEL=/path``, works offline); any model that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load and whose processor has a chat template. The default is SmolVLM-256M
(Idefics3), the architecture the tests build at random weights.

Guided decoding holds here as it does on vLLM: the request's JSON schema is compiled with
xgrammar, vLLM's default structured-output library, and its logits processor masks every token
that would break the schema. What it does not do, unlike vLLM: batching (requests run one at a
time; this is for tens of rows, not millions).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from typing import Any

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError, Reason, RowError
from vqa_operators.serving.base import ChatRequest, ChatResult, SamplingParams

log = logging.getLogger("vqa_operators.serving.transformers")

# public, instruction-tuned, 256M parameters, Idefics3 architecture (SigLIP + SmolLM2); about 0.5 GB of weights.
# The same architecture as the tests' tiny model, and one vLLM's CPU build loads without torchvision.
DEFAULT_CPU_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


def _image(url: str) -> Any:
    """A PIL image from a base64 data URL (the only image form the generators send)."""
    from PIL import Image

    head, sep, payload = url.partition(",")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise RowError(Reason.BAD_IMAGE, "the transformers backend takes images as base64 data URLs only")
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image.convert("RGB")


def to_processor_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-format messages -> (messages for the processor's chat template, the images in order of appearance)."""
    converted, images = [], []
    for message in messages:
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        given: list[dict[str, Any]] = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
        for part in given:
            if part.get("type") == "image_url":
                images.append(_image(part["image_url"]["url"]))
                parts.append({"type": "image"})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ConfigError(f"the transformers backend cannot send a {part.get('type')!r} message part")
        converted.append({"role": message["role"], "content": parts})
    return converted, images


class TransformersServing:
    """Runs chat requests one at a time through ``model.generate`` in a worker thread."""

    def __init__(
        self,
        model: str = DEFAULT_CPU_MODEL,
        *,
        temperature: float = settings.TEMPERATURE,
        top_p: float = settings.TOP_P,
        max_tokens: int = settings.MAX_TOKENS,
        seed: int | None = None,
        device: str = "cpu",
    ) -> None:
        if not model:
            raise ConfigError("the model is required: a Hub id or a local folder")
        self.model = model
        self.sampling = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        self.concurrency = 1
        self.device = device
        self._model: Any = None
        self._processor: Any = None
        self._grammars: Any = None  # xgrammar's compiler for this model's tokenizer
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            started = time.monotonic()
            try:
                from transformers import AutoModelForImageTextToText, AutoProcessor
            except ImportError as err:
                raise ConfigError(f"the transformers backend needs torch and transformers installed ({err})") from None
            try:
                processor = AutoProcessor.from_pretrained(self.model)
                model = AutoModelForImageTextToText.from_pretrained(self.model).to(self.device).eval()  # type: ignore[arg-type]  # transformers' own annotation of .to
            except OSError as err:
                # a Hub id that cannot be fetched (offline, private, misspelt) or a folder without the files
                raise ConfigError(f"cannot load model {self.model!r}: {str(err).splitlines()[0]}") from None
            if not getattr(processor, "chat_template", None):
                raise ConfigError(f"model {self.model!r} has no chat template in its processor files")
            import xgrammar

            vocab = model.get_output_embeddings().weight.shape[0]  # may be larger than the tokenizer's (padding)
            self._grammars = xgrammar.GrammarCompiler(
                xgrammar.TokenizerInfo.from_huggingface(processor.tokenizer, vocab_size=vocab)
            )
            self._processor, self._model = processor, model
            log.info("loaded %s (%s) on %s in %.1fs", self.model, type(model).__name__, self.device, time.monotonic() - started)

    def _guide(self, schema: dict[str, Any] | None) -> list[Any]:
        """xgrammar's logits processor for ``schema`` (one per generation: it keeps the match state), or none."""
        if schema is None:
            return []
        from xgrammar.contrib.hf import LogitsProcessor

        key = json.dumps(schema)
        if key not in self._compiled:
            self._compiled[key] = self._grammars.compile_json_schema(key, any_whitespace=True)
        return [LogitsProcessor(self._compiled[key])]

    def _generate(self, request: ChatRequest) -> ChatResult:
        import torch

        self._load()
        messages, images = to_processor_messages(request.messages)
        prompt = self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self._processor(images=images or None, text=prompt, return_tensors="pt").to(self.device)
        sample = self.sampling.temperature > 0
        seed = request.seed if request.seed is not None else self.sampling.seed
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            kwargs: dict[str, Any] = {
                "max_new_tokens": self.sampling.max_tokens,
                "do_sample": sample,
                "logits_processor": self._guide(request.schema),
            }
            if sample:
                kwargs.update(temperature=self.sampling.temperature, top_p=self.sampling.top_p)
            output = self._model.generate(**inputs, **kwargs)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        new = output[0, prompt_tokens:]
        eos = self._model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        finished = len(new) > 0 and int(new[-1]) in eos_ids
        return ChatResult(
            text=self._processor.decode(new, skip_special_tokens=True),
            finish_reason="stop" if finished or len(new) < self.sampling.max_tokens else "length",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new),
        )

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Generate in a worker thread (the event loop keeps preparing other rows' images meanwhile)."""
        return await asyncio.to_thread(self._generate, request)

    async def check(self) -> None:
        """Load the model now, so that a bad model id or folder fails before any row is read."""
        await asyncio.to_thread(self._load)

    async def aclose(self) -> None:
        """Nothing bound to the event loop; the model stays loaded for the next call."""
