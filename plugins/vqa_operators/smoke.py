"""The install's smoke checks, run inside a pod as the worker runs (``python -m vqa_operators smoke``): plain Python, no Airflow.

Each check says what a worker needs of its pod and whether it has it: its user, a read-only root
with a writable ``/tmp``, the data root (write an object, read it back, delete it), the model
server (its ``/models`` lists the model, with the API key), the model cache (where one is
mounted) and a GPU (where one was requested). ``vqa_smoke`` (the DAG) starts one pod per
topology with these checks and prints each verdict.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from vqa_operators.storage.uris import join_uri


class Verdict(BaseModel):
    """One check: passed (True), failed (False) or not asked of this pod (None), and what was seen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    check: str
    ok: bool | None
    detail: str

    def line(self, pod: str = "") -> str:
        """``PASS|FAIL|SKIP [pod ]check: detail``."""
        return f"{ {True: 'PASS', False: 'FAIL', None: 'SKIP'}[self.ok]:4} {pod + ' ' if pod else ''}{self.check}: {self.detail}"


def _check(name: str, probe: Callable[[], str]) -> Verdict:
    """``probe`` returns what it saw, or raises with what went wrong."""
    try:
        return Verdict(check=name, ok=True, detail=probe())
    except Exception as err:  # noqa: BLE001 - every failure is a verdict, with its reason
        return Verdict(check=name, ok=False, detail=f"{type(err).__name__}: {err}")


def user(expected_uid: int) -> str:
    uid, gid = os.getuid(), os.getgid()
    if uid != expected_uid:
        raise RuntimeError(f"runs as uid {uid}, not {expected_uid}")
    return f"uid {uid}, gid {gid}, groups {sorted(os.getgroups())}"


def read_only_root() -> str:
    try:
        with open("/vqa-smoke-probe", "w", encoding="utf-8"):
            pass
    except OSError as err:
        if err.errno in (30, 13):  # EROFS, EACCES
            with tempfile.NamedTemporaryFile(dir="/tmp") as handle:
                handle.write(b"x")
            return f"/ refuses writes ({os.strerror(err.errno)}); /tmp takes them"
        raise
    os.unlink("/vqa-smoke-probe")
    raise RuntimeError("/ is writable: the pod's root file system is not read-only")


def data_root(storage: Any, root: str, name: str) -> str:
    uri = join_uri(root.rstrip("/") + "/", f"smoke/{name}-{uuid.uuid4().hex[:8]}.txt")
    payload = f"vqa smoke {name}".encode()
    with storage.open_atomic(uri) as handle:
        handle.write(payload)
    if storage.read_bytes(uri) != payload:
        raise RuntimeError(f"{uri} read back other bytes than were written")
    storage.delete(uri)
    return f"wrote, read back and deleted {uri}"


def model_server(base_url: str, model: str | None, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(base_url.rstrip("/") + "/models", headers=headers)  # noqa: S310 - the deployment's model server
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - the deployment's model server
        served = [m["id"] for m in json.load(resp)["data"]]
    if model and model not in served:
        raise RuntimeError(f"{base_url} serves {served}, not {model}")
    return f"{base_url} serves {served}"


def writable(folder: str) -> str:
    """The model cache as vLLM will use it: ``check_model_cache``'s verdict, naming the owner and mode either way."""
    from vqa_operators.serving.vllm_server import check_model_cache

    check_model_cache({"HF_HOME": folder})
    info = Path(folder).stat()
    return f"{folder} is writable (owner {info.st_uid}:{info.st_gid}, mode {oct(info.st_mode & 0o7777)})"


def gpu(requested: int) -> str:
    """The devices NVIDIA's device plugin gives a container that requests ``nvidia.com/gpu``."""
    devices = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES")
    if len(devices) < requested:
        raise RuntimeError(f"{requested} GPU(s) requested, {len(devices)} device(s) in /dev (NVIDIA_VISIBLE_DEVICES={visible!r})")
    return f"{', '.join(devices)} (NVIDIA_VISIBLE_DEVICES={visible!r})"


def run_checks(
    *,
    storage: Any,
    root: str,
    name: str,
    expected_uid: int,
    base_url: str | None,
    model: str | None,
    api_key: str | None,
    model_cache: str | None,
    gpus: int,
    expect_gpu: bool,
) -> list[Verdict]:
    """Every check this pod can answer; the ones not asked of it are SKIP with why."""
    found = [
        _check("user", lambda: user(expected_uid)),
        _check("read-only root", read_only_root),
        _check("data root", lambda: data_root(storage, root, name)),
    ]
    if base_url:
        found.append(_check("model server", lambda: model_server(base_url, model, api_key)))
    else:
        found.append(Verdict(check="model server", ok=None, detail="none configured for this pod (vLLM would start in it)"))
    if model_cache:
        found.append(_check("model cache", lambda: writable(model_cache)))
    if gpus:
        verdict = _check("gpu", lambda: gpu(gpus))
        if verdict.ok is False and not expect_gpu:
            verdict = Verdict(check="gpu", ok=None, detail=f"not required (expect_gpu is off): {verdict.detail}")
        found.append(verdict)
    return found
