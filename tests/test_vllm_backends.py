"""vLLM started by the worker (``--serve-vllm``) and vLLM in the process (``LocalModelVLMServing_vllm``).

Each is run for real in the slow tier, with vLLM's CPU build on the tiny random-weight Idefics3.
The fast tier covers the pieces around them: the worker starting a process and waiting for
``/health`` (the test double in vLLM's place), a server that dies, and the batching adapter
driven with a stand-in engine that has ``vllm.LLM.chat``'s signature.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from scripts.local_vllm import VLLM_PYTHON, free_port, server_args
from testkit.data import make_jpeg
from tests import real_vllm
from tests.helpers import ROOT, run_worker
from tests.seed_examples import read_results, write_seed_inputs
from vqa_operators.exceptions import ServerUnavailableError
from vqa_operators.serving.base import ChatRequest
from vqa_operators.serving.vllm_local import LocalModelVLMServing_vllm
from vqa_operators.serving.vllm_server import CPU_ENV, VLLM_SERVER_MODULE


def test_worker_serves_the_model_itself(tmp_path: Path, images: list[Path]) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": images[0].name}) + "\n")
    proc = run_worker(
        "image_qa", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
        "--media-root", str(tmp_path), "--model", "served-here", "--serve-vllm",
        env={"VQA_VLLM_COMMAND": f"{sys.executable} {ROOT / 'testkit/openai_server.py'}", "VQA_VLLM_PORT": str(free_port()), "VQA_BASE_URL": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "starting model server" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["rows_out"] == 1


def test_server_that_dies_is_a_job_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.serving.vllm_server import serve_vllm

    monkeypatch.setenv("VQA_VLLM_COMMAND", f"{sys.executable} -c 'import sys; sys.exit(3)'")
    with pytest.raises(ServerUnavailableError, match="exited with code 3"), serve_vllm("m", port=free_port()):
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


# --- with vLLM's CPU build (slow tier) ---------------------------------------------------------


ENGINE_SCRIPT = """
import sys
from pathlib import Path
sys.path[:0] = [{plugins!r}, {root!r}]


def main() -> None:
    from tests.seed_examples import image_qa_example
    from vqa_operators import LocalModelVLMServing_vllm
    from vqa_operators.serving.vllm_server import CPU_ENGINE_ARGS

    # seed 002, Step 1, with the CPU build's engine arguments added
    serving = LocalModelVLMServing_vllm(
        hf_model_name_or_path={model!r},
        vllm_tensor_parallel_size=1,
        vllm_temperature=0.7,
        vllm_top_p=0.9,
        vllm_max_tokens=1024,
        engine_args=CPU_ENGINE_ARGS,
    )
    image_qa_example(serving)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file again
    main()
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_seed_002_with_vllm_in_the_process(tiny_idefics3: Path, tmp_path: Path) -> None:
    real_vllm.require_vllm()
    write_seed_inputs(tmp_path, make_jpeg)
    script = tmp_path / "engine_example.py"
    script.write_text(ENGINE_SCRIPT.format(plugins=str(ROOT / "plugins"), root=str(ROOT), model=str(tiny_idefics3)))
    env = {**os.environ, **CPU_ENV, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.run([str(VLLM_PYTHON), str(script)], capture_output=True, text=True, env=env, timeout=600, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out, errors = read_results(tmp_path, "imageqa")
    assert len(out) == 3 and all(set(r) == {"image", "qa_pairs"} and len(r["qa_pairs"]) == 3 for r in out)
    assert sorted(e["reason"] for e in errors) == ["image_not_found", "malformed_json"]


@pytest.mark.slow
@pytest.mark.vllm
def test_the_worker_starts_vllm_serves_the_model_and_stops_it(tiny_idefics3: Path, tmp_path: Path) -> None:
    real_vllm.require_vllm()
    inputs = real_vllm.write_inputs(tmp_path, images=6, videos=0)
    # the model folder is the served name, as `--serve-vllm` passes it; the flags are what a CPU needs
    port = free_port()
    env = {
        **os.environ, **CPU_ENV, "PYTHONPATH": str(ROOT / "plugins"), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
        "VQA_VLLM_COMMAND": f"{VLLM_PYTHON} -m {VLLM_SERVER_MODULE}", "VQA_VLLM_ARGS": shlex.join(server_args(None)),
        "VQA_VLLM_PORT": str(port), "VQA_BASE_URL": "",
    }
    argv = [
        sys.executable, "-m", "vqa_operators", "run", "image_qa", "--input", str(inputs["image"]), "--output", str(tmp_path / "out.jsonl"),
        "--media-root", str(tmp_path / "media"), "--model", str(tiny_idefics3), "--serve-vllm", "--seed", "1", "--max-num-seqs", "8",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"starting model server: {VLLM_PYTHON} -m {VLLM_SERVER_MODULE} --model {tiny_idefics3}" in proc.stderr
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert manifest["rows_in"] == 6 and manifest["rows_out"] >= real_vllm.TARGET * 6 and manifest["model"] == str(tiny_idefics3)
    with socket.socket() as sock:  # the server went with the worker
        assert sock.connect_ex(("127.0.0.1", port)) != 0


