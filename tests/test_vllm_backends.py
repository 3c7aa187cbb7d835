"""The two vLLM paths that can be exercised without a GPU.

- ``--serve-vllm``: the worker starts a server process, waits for ``/health`` and uses it. Here the
  process is the OpenAI-compatible test double (``VQA_VLLM_COMMAND``), not vLLM.
- ``LocalModelVLMServing_vllm``: the batching adapter, driven with a STAND-IN engine object that has
  ``vllm.LLM.chat``'s signature. vLLM itself is not run here (it needs CUDA).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import types
from pathlib import Path

import pytest

from tests.test_worker_cli import ROOT, run_worker
from vqa_operators.exceptions import ServerUnavailableError
from vqa_operators.serving.base import ChatRequest
from vqa_operators.serving.vllm_local import LocalModelVLMServing_vllm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_worker_serves_the_model_itself(tmp_path: Path, images: list[Path]) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": images[0].name}) + "\n")
    proc = run_worker(
        "image_qa", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
        "--media-root", str(tmp_path), "--model", "served-here", "--serve-vllm",
        env={"VQA_VLLM_COMMAND": f"{sys.executable} {ROOT / 'tests/doubles/openai_server.py'}", "VQA_VLLM_PORT": str(free_port()), "VQA_BASE_URL": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "starting model server" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["rows_out"] == 1


def test_server_that_dies_is_a_job_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.serving.vllm_server import serve_vllm

    monkeypatch.setenv("VQA_VLLM_COMMAND", f"{sys.executable} -c 'import sys; sys.exit(3)'")
    with pytest.raises(ServerUnavailableError, match="exited with code 3"):
        with serve_vllm("m", port=free_port()):
            pass


class StandInEngine:
    """Records ``chat`` calls; answers each conversation with its index in the batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, list]] = []

    def chat(self, conversations, sampling_params, use_tqdm=False):
        self.calls.append((conversations, sampling_params))
        out = []
        for i, _ in enumerate(conversations):
            completion = types.SimpleNamespace(text=f'{{"i": {i}}}', finish_reason="stop", token_ids=[1, 2])
            out.append(types.SimpleNamespace(outputs=[completion], prompt_token_ids=[1, 2, 3]))
        return out


@pytest.fixture
def fake_vllm_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in ``vllm.sampling_params`` classes that keep their keyword arguments."""
    module = types.ModuleType("vllm.sampling_params")

    class Params(types.SimpleNamespace):
        pass

    module.SamplingParams = Params
    module.StructuredOutputsParams = Params
    package = types.ModuleType("vllm")
    package.sampling_params = module
    monkeypatch.setitem(sys.modules, "vllm", package)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module)


def test_local_vllm_batches_concurrent_requests(fake_vllm_sampling) -> None:
    engine = StandInEngine()
    serving = LocalModelVLMServing_vllm("some/model", vllm_temperature=0.3, vllm_top_p=0.8, vllm_max_tokens=99, engine=engine)
    schema = {"type": "object"}

    async def burst():
        requests = [ChatRequest(messages=[{"role": "user", "content": f"r{i}"}], schema=schema, seed=i) for i in range(10)]
        results = await asyncio.gather(*(serving.chat(r) for r in requests))
        await serving.aclose()
        return results

    results = asyncio.run(burst())
    assert len(engine.calls) == 1  # ten concurrent rows, one LLM.chat batch
    conversations, params = engine.calls[0]
    assert [c[0]["content"] for c in conversations] == [f"r{i}" for i in range(10)]
    assert [p.seed for p in params] == list(range(10))
    assert params[0].temperature == 0.3 and params[0].top_p == 0.8 and params[0].max_tokens == 99
    assert params[0].structured_outputs.json == schema
    assert [r.text for r in results] == [f'{{"i": {i}}}' for i in range(10)]
