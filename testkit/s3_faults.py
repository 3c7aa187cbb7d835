"""A fault-injecting HTTP proxy in front of an S3 server (moto): the throttling, failing, flaky store of real infrastructure.

Each request is passed to the upstream server unchanged, or meets one fault, chosen by a seeded
random draw with the configured rates:

- ``slowdown``: 503 with S3's ``SlowDown`` error document (throttling);
- ``internal``: 500 with ``InternalError``;
- ``drop``: the connection closed before the request reaches the server (no answer at all);
- ``drop_after``: the request is applied upstream, then the connection closed before the answer
  (a write that landed, but whose client never heard so);
- ``cut``: the answer's headers and half its body, then the connection closed (a read cut off);
- ``slow``: the answer delayed by ``delay_s``.

So that retries converge, no request (method and path) meets more than ``max_in_a_row`` faults in a
row; ``persistent`` makes every request whose path contains a marker fail with ``SlowDown`` for good
(a store that stays down), and ``denied`` answers 403 ``AccessDenied`` to every request whose path
contains a marker (a definite answer about those objects). ``counts`` says what was injected.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "drop", "drop_after", "cut", "slow")
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "host",
    "content-length",
}


def _error_document(code: str, message: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault</RequestId></Error>'.encode()


class S3FaultProxy:
    """``with S3FaultProxy(upstream, rates={"slowdown": 0.1, ...}, seed=1) as proxy: proxy.url``."""

    def __init__(
        self,
        upstream: str,
        rates: dict[str, float] | None = None,
        *,
        seed: int = 0,
        delay_s: float = 0.3,
        max_in_a_row: int = 4,
    ) -> None:
        unknown = set(rates or {}) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.upstream = urlsplit(upstream)
        self.rates = dict(rates or {})
        self.delay_s = delay_s
        self.max_in_a_row = max_in_a_row
        self.persistent: str | None = None
        self.denied: str | None = None
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self._random = random.Random(seed)
        self._in_a_row: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def injected(self) -> int:
        """Faults injected so far (every kind)."""
        with self._lock:
            return sum(self.counts.values())

    def _choose(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self.persistent is not None and self.persistent in path:
                self.counts["persistent"] += 1
                return "persistent"
            if self.denied is not None and self.denied in path:
                self.counts["denied"] += 1
                return "denied"
            key = f"{method} {path}"
            draw, fault = self._random.random(), None
            for name in FAULTS:
                rate = self.rates.get(name, 0.0)
                if draw < rate:
                    fault = name
                    break
                draw -= rate
            if fault is not None and self._in_a_row[key] >= self.max_in_a_row:
                fault = None
            if fault is None or fault == "slow":
                self._in_a_row.pop(key, None)
            else:
                self._in_a_row[key] += 1
            if fault is not None:
                self.counts[fault] += 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                return

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(data)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str) -> None:
                document = b"" if self.command == "HEAD" else _error_document(code, "injected by the fault proxy")
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            def _close(self) -> None:
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    headers["Host"] = self.headers.get("Host", proxy.upstream.netloc)
                    headers["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=headers)
                    answer = connection.getresponse()
                    data = answer.read()
                    return answer.status, [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP], data
                finally:
                    connection.close()

            def _serve(self) -> None:
                body = self._body()
                fault = proxy._choose(self.command, self.path.split("?", 1)[0])
                if fault == "persistent" or fault == "slowdown":
                    return self._error(503, "SlowDown")
                if fault == "denied":
                    return self._error(403, "AccessDenied")
                if fault == "internal":
                    return self._error(500, "InternalError")
                if fault == "drop":
                    return self._close()
                if fault == "slow":
                    time.sleep(proxy.delay_s)
                status, headers, data = self._forward(body)
                if fault == "drop_after":
                    return self._close()
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return None
                if fault == "cut" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    return self._close()
                self.wfile.write(data)
                return None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve  # noqa: N815 - http.server names its handlers so

        return Handler
