"""TEST DOUBLE: an OpenAI-compatible chat server on localhost, shaped like ``vllm serve``.

It is not a model. It speaks real HTTP and refuses what vLLM 0.32/0.33 refuses, with vLLM's
status codes and error bodies (``vllm_rules.py``: unknown model 404; too many images, bad image
URLs, out-of-range sampling fields, JSON schemas vLLM's structured-output backends refuse 400; a
schema xgrammar's compiler fails on 500), as ``tests/serving/test_real_vllm.py`` checks against vLLM
itself. It answers with JSON built from the requested schema, as guided decoding would: strings
stop at their ``maxLength``, follow their ``pattern``, and (on vLLM's default backend) end with
the raw control characters xgrammar lets through; each answer is checked against xgrammar's own
grammar for the schema. The strings state what the double received (image count and sizes), so
tests can check what reached the server.
Tests script faults with ``enqueue(Reply(...))`` or a ``responder`` hook, or inject them at
random with ``inject(rates, seed=...)``: each request draws at most one fault from ``FAULTS``.

For benchmarks it simulates a continuous-batching server: with ``slots`` set, at most that many
requests are served at once, each for ``latency`` seconds, the rest wait in a queue (as vLLM's
``max_num_seqs`` does); ``decode_images=False`` checks image headers only, so the double's own CPU
stays out of the client's way; ``GET /stats`` reports server-side timings.

Run it standalone: ``python testkit/openai_server.py MODEL --host 127.0.0.1 --port 8000
[--slots 32 --latency 1.0 --light]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

if not __package__:  # run as a script (python testkit/openai_server.py): make `testkit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testkit import vllm_rules
from testkit.verdicts import KEEP_ALL, ScriptedVerdicts


@dataclass
class Reply:
    """A scripted answer: ``content`` (None = generated from the schema), HTTP ``status``, or a dropped connection."""

    content: str | None = None
    status: int = 200
    finish_reason: str = "stop"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    # spoil the generated content: "truncate" (cut, finish_reason "length"), "invalid_json", "schema_mismatch"
    spoil: str | None = None


# what ``inject`` can draw: HTTP faults, a hang longer than any test's client timeout, a dropped
# connection, and content the client must repair or reject
FAULTS: dict[str, Reply] = {
    "429": Reply(status=429, headers={"Retry-After": "0.05"}),
    "500": Reply(status=500),
    "503": Reply(status=503),
    "timeout": Reply(delay=3.0),
    "drop": Reply(drop=True),
    "truncated": Reply(spoil="truncate", finish_reason="length"),
    "invalid_json": Reply(spoil="invalid_json"),
    "schema_mismatch": Reply(spoil="schema_mismatch"),
}


def outage_after(good: int) -> Callable[[dict[str, Any]], Reply]:
    """A responder: answer ``good`` requests, then drop every connection (the server went down)."""
    served = 0
    lock = threading.Lock()

    def responder(body: dict[str, Any]) -> Reply:
        nonlocal served
        with lock:
            served += 1
            return Reply() if served <= good else Reply(drop=True)

    return responder


def _without_image_data(messages: list[dict[str, Any]], sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """The messages with each image's data URL replaced by its size."""
    light, sizes_left = [], iter(sizes)
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image", "size": next(sizes_left)} if p.get("type") == "image_url" else p for p in content]
        light.append({**message, "content": content})
    return light


# xgrammar lets raw control characters into length-bounded strings (vLLM's default backend): the
# double writes a tab and a BEL at the end of each such string, which the client must normalise away
CONTROL_QUIRK = "\t\x07"
_QUIRK_MARK = "\ue000"
_QUIRK_MARK_JSON = json.dumps(_QUIRK_MARK)[1:-1]  # how the mark stands in json.dumps' output


def schema_instance(schema: dict[str, Any], root: dict[str, Any], note: str, name: str = "value", index: int = 0) -> Any:
    """A value that satisfies ``schema`` (the subset the project sends), with strings that carry ``note``."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return schema_instance(target, root, note, name, index)
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"] or schema["anyOf"]
        return schema_instance(options[0], root, note, name, index)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][index % len(schema["enum"])]
    kind = schema.get("type")
    if kind == "object":
        return {k: schema_instance(v, root, note, k, index) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        count = max(schema.get("minItems", 1), 1)
        count = min(count, schema.get("maxItems", count))
        return [schema_instance(schema.get("items", {}), root, note, name, i) for i in range(count)]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    # a few words of its own, as a model's answers differ: without them two strings of one answer share all but a digit
    # (and the merge's near-duplicate check, rightly, takes them for one)
    seed = hashlib.sha256(f"{note}|{name}|{index}".encode()).digest()
    words = " ".join(
        "".join("bcdfghjklmnprstvwz"[b % 18] + "aeiou"[b // 18 % 5] for b in seed[i : i + 2]) for i in range(0, 8, 2)
    )
    text = f"{name} {index + 1}: {note} {words}"
    if "pattern" in schema:
        return _patterned(schema["pattern"], text)
    if "maxLength" in schema:
        # what guided decoding does: the string stops at its bound; and xgrammar's quirk at the end
        limit = schema["maxLength"] - len(CONTROL_QUIRK)
        return text[: max(limit, 1)] + (_QUIRK_MARK if limit >= 1 else "")
    return text


def _patterned(pattern: str, text: str) -> str:
    """``text`` after the literal a ``^literal...`` pattern starts with, cut until the pattern accepts it."""
    literal = re.match(r"\^((?:[^.*+?()\[\]{}|$^\\]|\\.)*)", pattern)
    prefix = re.sub(r"\\(.)", r"\1", literal.group(1)) if literal else ""
    schema = json.dumps({"type": "string", "pattern": pattern})

    def accepted(candidate: str) -> bool:
        try:
            return vllm_rules.grammar_accepts(schema, json.dumps(candidate))
        except vllm_rules.Refusal:  # a pattern xgrammar cannot compile: llguidance decodes it, and means what Python means
            return re.fullmatch(pattern, candidate) is not None

    for end in range(len(text), 0, -1):
        candidate = f"{prefix} {text[:end]}" if prefix else text[:end]
        if accepted(candidate):
            return candidate
    raise ValueError(f"the test double cannot write a string for the pattern {pattern!r}")


class _Listener(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: dozens of clients connecting at once would see
    # their SYNs dropped and retried a second later. uvicorn (vLLM's server) uses 2048.
    request_queue_size = 2048
    daemon_threads = True


class OpenAITestServer:
    """The test double's state and lifecycle (``start``/``stop``), with its recorded requests."""

    def __init__(self, model: str = "test-vlm", host: str = "127.0.0.1", port: int = 0) -> None:
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.script: deque[Reply] = deque()
        self.responder: Callable[[dict[str, Any]], Reply | None] | None = None
        self.latency = 0.0
        self.concurrent = 0
        self.peak_concurrency = 0
        self.fault_rates: dict[str, float] = {}
        self.required_key: str | None = None  # if set, other bearer tokens get 401, as `vllm serve --api-key`
        self.injected: Counter[str] = Counter()
        # the continuous-batching simulation: None = unlimited; else at most ``slots`` served at once
        self.slots: int | None = None
        self.decode_images = True
        self.keep_requests = True
        self.timings: list[tuple[float, float, float]] = []  # (arrived, slot taken, answered), monotonic
        # what vLLM was started with: --structured-outputs-config.backend, --limit-mm-per-prompt, --max-model-len
        self.backend = "auto"
        self.max_images = 16
        self.max_model_len = 32768
        # every generated answer is checked against the request's grammar (off only where the CPU is measured)
        self.check_answers = True
        # the quality gate's verdicts (testkit/verdicts.py): by default every pair is kept
        self.verdicts: ScriptedVerdicts = KEEP_ALL
        # a speech-to-text model served beside the VLM: None, as a VLM-only vLLM, has no /v1/audio/transcriptions (404)
        self.transcription_model: str | None = None
        self.transcriptions: list[dict[str, Any]] = []
        # ``hold(when)``: a completion request ``when`` picks waits, unanswered (``held`` of them now), until ``release()``
        self.hold_when: Callable[[dict[str, Any]], bool] | None = None
        self.held = 0
        self.holding = threading.Event()  # set when a request is first held
        self._released = threading.Event()
        self._slot_gate: threading.Semaphore | None = None
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self._httpd = _Listener((host, port), self._handler())
        vllm_rules.warm_up()  # importing xgrammar takes seconds: not inside the first request's timeout
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """Its URL on this machine (127.0.0.1 when it listens on every address)."""
        host, port = cast(tuple[str, int], self._httpd.server_address[:2])
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/v1"

    def url_at(self, address: str) -> str:
        """Its URL at ``address``: where a container reaches it, if it listens on every address."""
        port = cast(tuple[str, int], self._httpd.server_address[:2])[1]
        return f"http://{address}:{port}/v1"

    def simulate(
        self, *, slots: int, latency: float, decode_images: bool = False, keep_requests: bool = False
    ) -> OpenAITestServer:
        """Serve like a continuous-batching server: ``slots`` requests at once, ``latency`` seconds each."""
        self.slots, self.latency = slots, latency
        self._slot_gate = threading.Semaphore(slots)
        self.decode_images, self.keep_requests = decode_images, keep_requests
        self.check_answers = decode_images  # light mode leaves the CPU to the client being measured
        return self

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        """Server-side figures since the last reset: requests, first arrival to last answer, peak in flight."""
        with self._lock:
            timings = list(self.timings)
            peak = self.peak_concurrency
            if reset:
                self.timings.clear()
                self.peak_concurrency = 0
        if not timings:
            return {"requests": 0, "span_s": 0.0, "peak_concurrency": peak}
        first, last = min(t[0] for t in timings), max(t[2] for t in timings)
        return {
            "requests": len(timings),
            "first": first,
            "last": last,
            "span_s": last - first,
            "peak_concurrency": peak,
            "mean_queue_s": sum(t[1] - t[0] for t in timings) / len(timings),
            "max_queue_s": max(t[1] - t[0] for t in timings),
            "slots": self.slots,
            "latency": self.latency,
        }

    def enqueue(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order."""
        self.script.extend(replies)

    def inject(self, rates: dict[str, float], *, seed: int = 0) -> None:
        """Answer each request with fault ``name`` at probability ``rates[name]`` (see FAULTS)."""
        unknown = set(rates) - set(FAULTS)
        if unknown or sum(rates.values()) > 1:
            raise ValueError(f"unknown faults {unknown} or rates summing over 1: {rates}")
        with self._lock:
            self.fault_rates = dict(rates)
            self._rng = random.Random(seed)

    def hold(self, when: Callable[[dict[str, Any]], bool]) -> None:
        """Hold every completion request ``when`` picks (by its body: a row's seed, say), unanswered, until ``release()``; answer the others.

        A test gates the double this way instead of slowing it down: "the run is stopped mid-way, these
        rows done and those not" holds whatever the machine's speed.
        """
        with self._lock:
            self.hold_when = when
            self.holding.clear()
            self._released.clear()

    def release(self) -> None:
        """Let the held requests (and every later one) be answered."""
        with self._lock:
            self.hold_when = None
        self._released.set()

    def _admit(self, body: dict[str, Any]) -> None:
        """While ``hold`` is on and picks this request, wait for ``release()`` (at most 120 s)."""
        with self._lock:
            held = self.hold_when is not None and self.hold_when(body)
            if held:
                self.held += 1
                self.holding.set()
        if held:
            try:
                self._released.wait(timeout=120)  # bounded: a test that never releases fails instead of hanging the server
            finally:
                with self._lock:
                    self.held -= 1

    def reset(self) -> None:
        """Forget recorded requests, scripts, injected faults and counters; release any held request."""
        self.release()
        with self._lock:
            self.requests.clear()
            self.authorizations.clear()
            self.script.clear()
            self.responder = None
            self.latency = 0.0
            self.slots, self._slot_gate = None, None
            self.decode_images, self.keep_requests = True, True
            self.backend, self.max_images, self.max_model_len, self.check_answers = "auto", 16, 32768, True
            self.verdicts = KEEP_ALL
            self.transcription_model = None
            self.transcriptions.clear()
            self.timings.clear()
            self.peak_concurrency = 0
            self.fault_rates = {}
            self.required_key = None
            self.injected.clear()

    def start(self) -> OpenAITestServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-test-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            if self.script:
                return self.script.popleft()
            draw, edge = self._rng.random(), 0.0
            for name, rate in self.fault_rates.items():
                edge += rate
                if draw < edge:
                    self.injected[name] += 1
                    return FAULTS[name]
        if self.responder is not None:
            reply = self.responder(body)
            if reply is not None:
                return reply
        return Reply()

    def _complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """(status, payload, headers), or None to drop the connection."""
        arrived = time.monotonic()
        try:
            sizes, decoder = vllm_rules.validate_request(
                body,
                model=self.model,
                max_images=self.max_images,
                max_model_len=self.max_model_len,
                backend=self.backend,
                decode_images=self.decode_images,
            )
        except vllm_rules.Refusal as exc:
            return exc.status, {"error": {"message": str(exc), "type": exc.kind, "param": None, "code": exc.status}}, {}
        with self._lock:
            if self.keep_requests:
                self.requests.append(body)
        reply = self._next_reply(body)
        if reply.drop:
            return None
        self._admit(body)
        if self._slot_gate is not None:
            with self._slot_gate:
                taken = time.monotonic()
                time.sleep(self.latency + reply.delay)
            with self._lock:
                self.timings.append((arrived, taken, time.monotonic()))
        else:
            time.sleep(self.latency + reply.delay)
        if reply.status != 200:
            return (
                reply.status,
                {"error": {"message": f"scripted HTTP {reply.status}", "type": "ServerError", "code": reply.status}},
                reply.headers,
            )
        content = reply.content
        # hash and count the text and image sizes, not megabytes of base64
        seen = _without_image_data(body["messages"], sizes)
        if content is None:
            # a digest of the request makes different prompts get different strings, as a model's
            # would, while the same request (same seed) gets the same reply, as seeded sampling does
            digest = hashlib.sha256(json.dumps([seen, body.get("seed")], sort_keys=True).encode()).hexdigest()[:8]
            note = f"saw {len(sizes)} image(s) " + ",".join(f"{w}x{h}" for w, h in sizes) + f" (reply {digest})"
            schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
            content = (
                self._write(cast(dict[str, Any], schema), note, decoder, self.verdicts.fields(body))
                if decoder is not None
                else note
            )
        if reply.spoil == "truncate":
            content = content[: len(content) // 2]
        elif reply.spoil == "invalid_json":
            content = "Sure! Here are the pairs: question one, answer one"
        elif reply.spoil == "schema_mismatch":
            content = json.dumps({"unexpected": ["not", "the", "schema"]})
        prompt_chars = sum(len(json.dumps(m.get("content"))) for m in seen)
        return (
            200,
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reply.finish_reason}
                ],
                "usage": {
                    "prompt_tokens": prompt_chars // 4,
                    "completion_tokens": len(content) // 4,
                    "total_tokens": prompt_chars // 4 + len(content) // 4,
                },
            },
            reply.headers,
        )

    def _write(self, schema: dict[str, Any], note: str, decoder: str, scripted: dict[str, Any] | None = None) -> str:
        """The answer guided decoding could have written for ``schema`` (with ``scripted`` fields): checked against xgrammar's own grammar."""
        value = schema_instance(schema, schema, note)
        if scripted:
            value = {**value, **scripted}
        content = json.dumps(value)
        if decoder != "xgrammar":
            return content.replace(_QUIRK_MARK_JSON, "")  # llguidance writes no raw control characters
        content = content.replace(_QUIRK_MARK_JSON, CONTROL_QUIRK)
        if self.check_answers and not vllm_rules.grammar_accepts(json.dumps(schema), content):
            raise RuntimeError(
                f"its answer breaks the request's grammar, which vLLM's guided decoding never would: {content[:300]!r}"
            )
        return content

    def _transcribe(self, content_type: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        """``/v1/audio/transcriptions`` as vLLM answers it: a multipart form with ``file`` and ``model``; WAV only (vLLM reads more)."""
        import email.parser
        import email.policy
        import io
        import wave

        if self.transcription_model is None:  # vLLM registers the route only for speech-to-text models
            return 404, {"detail": "Not Found"}
        if not content_type.startswith("multipart/form-data"):
            return 422, {"detail": [{"type": "missing", "loc": ["body", "file"], "msg": "Field required"}]}
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        fields = {
            str(part.get_param("name", header="content-disposition")): cast(bytes, part.get_payload(decode=True))
            for part in message.iter_parts()
        }
        if "file" not in fields:
            return 422, {"detail": [{"type": "missing", "loc": ["body", "file"], "msg": "Field required"}]}
        model = (fields.get("model") or b"").decode()
        if model and model != self.transcription_model:
            return 404, {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "code": 404}}
        audio = fields["file"]
        if len(audio) > 25 * 1024 * 1024:  # VLLM_MAX_AUDIO_CLIP_FILESIZE_MB
            return 400, {"error": {"message": "Maximum file size exceeded", "type": "BadRequestError", "code": 400}}
        try:
            with wave.open(io.BytesIO(audio)) as wav:
                seconds = wav.getnframes() / wav.getframerate()
        except (wave.Error, EOFError, ZeroDivisionError):
            return 400, {"error": {"message": "Invalid or unsupported audio file.", "type": "BadRequestError", "code": 400}}
        with self._lock:
            self.transcriptions.append(
                {"model": model, "seconds": seconds, "response_format": (fields.get("response_format") or b"json").decode()}
            )
        return 200, {"text": f" Transcript of {seconds:.2f} s of audio."}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout, or it was killed)
                    self.close_connection = True

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, {})
                elif self.path.startswith("/stats"):
                    self._send(200, server.stats(reset="reset" in self.path))
                elif self.path == "/v1/models":
                    served = [server.model, *([server.transcription_model] if server.transcription_model else [])]
                    self._send(
                        200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "vllm"} for m in served]}
                    )
                else:
                    self._send(404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path == "/v1/audio/transcriptions":
                    self._send(*server._transcribe(self.headers.get("Content-Type", ""), raw))
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "invalid JSON body", "type": "BadRequestError", "code": 400}})
                    return
                if server.required_key is not None and self.headers.get("Authorization") != f"Bearer {server.required_key}":
                    self._send(401, {"error": {"message": "Unauthorized", "type": "AuthenticationError", "code": 401}})
                    return
                with server._lock:
                    server.authorizations.append(self.headers.get("Authorization"))
                    server.concurrent += 1
                    server.peak_concurrency = max(server.peak_concurrency, server.concurrent)
                try:
                    try:
                        answer = server._complete(body)
                    except Exception as exc:  # noqa: BLE001 - a broken test responder: say so instead of dropping the connection
                        answer = (
                            500,
                            {"error": {"message": f"test double failed: {exc!r}", "type": "InternalServerError", "code": 500}},
                            {},
                        )
                    if answer is None:
                        self.close_connection = True
                        self.connection.shutdown(2)  # dropped connection, no response
                        return
                    self._send(*answer)
                finally:
                    with server._lock:
                        server.concurrent -= 1

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible TEST DOUBLE (not a model)")
    parser.add_argument("model", nargs="?")
    parser.add_argument(
        "--model", dest="model_option", help="as vLLM's server takes it (the worker's --serve-vllm passes --model)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--slots", type=int, default=None, help="simulate a continuous-batching server with this many slots")
    parser.add_argument("--light", action="store_true", help="check image headers only (no decode)")
    args, _ = parser.parse_known_args()
    model = args.model_option or args.model
    if not model:
        parser.error("give the model name, as an argument or as --model")
    server = OpenAITestServer(model, args.host, args.port)
    server.latency = args.latency
    if args.slots:
        server.simulate(slots=args.slots, latency=args.latency, decode_images=not args.light)
    print(f"test double serving {model} at {server.base_url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server._httpd.serve_forever()


if __name__ == "__main__":
    main()
