"""vLLM's CPU build serving a model on this machine: the model server of ``make test``, ``make demo`` and ``make bench``.

vLLM runs from its own environment (``.venv-vllm``, ``make vllm-venv``), started through the same
``serve_vllm`` the worker's ``--serve-vllm`` uses, with the flags vLLM's CPU build needs
(``vllm_server.cpu_args``) and vLLM's default structured-output settings unless ``backend`` says
otherwise.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from vqa_operators.serving.vllm_server import CPU_ENV, CPU_MAX_MODEL_LEN, VLLM_SERVER_MODULE, cpu_args, serve_vllm  # noqa: E402

VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
MAX_MODEL_LEN = CPU_MAX_MODEL_LEN
MAX_IMAGES = 16


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_available(venv: Path = VLLM_VENV) -> str | None:
    """Why vLLM's CPU build cannot run here, or None if it can.

    ``make vllm-venv`` creates the environment before it installs into it, and marks it
    ``.installed`` only once the install succeeded: an environment without the mark (the install
    failed, or was stopped), or without the ``vllm`` package, cannot serve.
    """
    if not (venv / "bin" / "python").exists():
        return f"{venv / 'bin' / 'python'} is missing: run `make vllm-venv`"
    if not (venv / ".installed").exists():
        return f"{venv} was created but its install did not finish (no {venv / '.installed'}): run `make vllm-venv` again"
    if not any(venv.glob("lib/python*/site-packages/vllm/__init__.py")):
        return f"{venv} has no vllm package: run `make vllm-venv` again"
    return None


def server_args(
    served_name: str | None, *, backend: str = "auto", max_num_seqs: int | None = None, max_model_len: int = MAX_MODEL_LEN
) -> list[str]:
    """The flags: CPU build, context, image limit, the name requests use (default: the model), the structured-output backend."""
    args = [*cpu_args(max_model_len), "--limit-mm-per-prompt", f'{{"image": {MAX_IMAGES}}}']
    if served_name:
        args += ["--served-model-name", served_name]
    if backend != "auto":  # "auto" is vLLM's default: pass nothing, so the default is what runs
        args += ["--structured-outputs-config.backend", backend]
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    return args


@contextlib.contextmanager
def serve_local_vllm(
    model: str | Path,
    served_name: str,
    *,
    backend: str = "auto",
    log: IO[bytes] | None = None,
    max_num_seqs: int | None = None,
    max_model_len: int = MAX_MODEL_LEN,
    offline: bool = True,
    startup_timeout: float = 1800.0,
    keep_alive_s: int | None = None,
) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on ``model`` (a folder, or a Hub id with ``offline=False``); yields its /v1 URL.

    ``keep_alive_s``: how long the server keeps an idle connection open (vLLM's ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``,
    5 s by default); a client that pools connections longer must not be faster than the server to reuse one.
    """
    if reason := vllm_available():
        raise RuntimeError(reason)
    # no usage reports from a test or demo machine; no Hub look-ups for a model on disk
    env = {
        **CPU_ENV,
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        **({"HF_HUB_OFFLINE": "1"} if offline else {}),
        **({"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(keep_alive_s)} if keep_alive_s else {}),
    }
    with serve_vllm(
        str(model),
        port=free_port(),
        command=[str(VLLM_PYTHON), "-m", VLLM_SERVER_MODULE],
        args=server_args(served_name, backend=backend, max_num_seqs=max_num_seqs, max_model_len=max_model_len),
        env=env,
        log=log,
        startup_timeout=startup_timeout,
    ) as base_url:
        yield base_url
