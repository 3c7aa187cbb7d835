"""Start ``vllm serve`` beside the worker (in a GPU pod) and wait until it is healthy.

The command is ``vllm serve`` unless ``VQA_VLLM_COMMAND`` names another (the tests start their
OpenAI-compatible test double this way); extra flags come from ``VQA_VLLM_ARGS`` and the port
from ``VQA_VLLM_PORT`` (8000).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from vqa_operators.exceptions import ServerUnavailableError


def vllm_command(model: str, port: int, max_num_seqs: int | None = None) -> list[str]:
    """The argv that serves ``model`` on ``127.0.0.1:port`` with the batch size the client sizes its concurrency for."""
    base = shlex.split(os.environ.get("VQA_VLLM_COMMAND", "vllm serve"))
    extra = shlex.split(os.environ.get("VQA_VLLM_ARGS", ""))
    if max_num_seqs is not None and not any(a.startswith("--max-num-seqs") for a in extra):
        extra += ["--max-num-seqs", str(max_num_seqs)]
    return [*base, model, "--host", "127.0.0.1", "--port", str(port), *extra]


@contextlib.contextmanager
def serve_vllm(model: str, *, port: int | None = None, max_num_seqs: int | None = None, startup_timeout: float = 1800.0) -> Iterator[str]:
    """Run the server for the duration of the block and yield its ``/v1`` base URL.

    Raises ServerUnavailableError if the process exits or ``/health`` does not answer 200 in time.
    """
    port = port or int(os.environ.get("VQA_VLLM_PORT", "8000"))
    argv = vllm_command(model, port, max_num_seqs)
    print(f"starting model server: {shlex.join(argv)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(argv, stdout=sys.stderr, stderr=sys.stderr)  # noqa: S603 - argv from config
    health = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ServerUnavailableError(f"model server exited with code {proc.returncode} before it was healthy")
            try:
                with urllib.request.urlopen(health, timeout=5) as resp:  # noqa: S310 - loopback URL
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ServerUnavailableError(f"model server not healthy after {startup_timeout:.0f}s")
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
