"""vLLM started by the worker (``--serve-vllm``), vLLM in the process (``LocalModelVLMServing_vllm``) and a run's own vLLM.

Each is run for real in the slow tier, with vLLM's CPU build on the tiny random-weight Idefics3 (the
worker's ``--serve-vllm`` inside a GPU pod, as its spec stands: ``tests/operators/test_pods_run.py``).
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
from vqa_operators.seed_compat.serving import LocalModelVLMServing_vllm
from vqa_operators.serving.base import ChatRequest
from vqa_operators.serving.vllm_server import CPU_ENV, VLLM_SERVER_MODULE


def test_worker_serves_the_model_itself(tmp_path: Path, images: list[Path]) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": images[0].name}) + "\n")
    proc = run_worker(
        "image_qa",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--media-root",
        str(tmp_path),
        "--model",
        "served-here",
        "--serve-vllm",
        env={
            "VQA_VLLM_COMMAND": f"{sys.executable} {ROOT / 'testkit/openai_server.py'}",
            "VQA_VLLM_PORT": str(free_port()),
            "VQA_BASE_URL": "",
        },
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
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(script)], capture_output=True, text=True, env=env, timeout=600, check=False, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out, errors = read_results(tmp_path, "imageqa")
    assert len(out) == 3 and all(set(r) == {"image", "qa_pairs"} and len(r["qa_pairs"]) == 3 for r in out)
    assert sorted(e["reason"] for e in errors) == ["image_not_found", "malformed_json"]


@pytest.mark.slow
@pytest.mark.vllm
def test_a_run_scoped_vllm_serves_every_task_of_a_dag_run_and_loads_the_model_once(
    tiny_idefics3: Path, tmp_path: Path, s3, bucket: str, s3_endpoint: str
) -> None:
    """``VQA_MODEL_SERVER=run`` in local mode: the setup task starts vLLM's CPU build once, all ten worker tasks of a video_qa
    run (ingest, initial, multiagent, final and quality, on two shards) call it, and the teardown stops it."""
    import sqlite3

    from tests.airflow_env import airflow, airflow_env

    real_vllm.require_vllm()
    inputs = real_vllm.write_inputs(tmp_path, images=0, videos=2, video_files=1)
    for path in (tmp_path / "media").iterdir():
        s3.put_object(Bucket=bucket, Key=f"media/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket=bucket, Key="input/videos.jsonl", Body=inputs["video"].read_bytes())
    home = tmp_path / "airflow"
    env = airflow_env(home, s3_endpoint=s3_endpoint, vlm_base_url="http://127.0.0.1:9/v1", model=str(tiny_idefics3))
    del env["AIRFLOW_CONN_VQA_VLM"]  # no model service: the run serves its own
    env.update(
        {
            **CPU_ENV,
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VQA_MODEL_SERVER": "run",
            "VQA_MODEL": str(tiny_idefics3),
            "VQA_VLLM_COMMAND": f"{VLLM_PYTHON} -m {VLLM_SERVER_MODULE}",
            "VQA_VLLM_ARGS": shlex.join(server_args(None)),
            "VQA_MAX_NUM_SEQS": "8",
        }
    )
    assert airflow("db", "migrate", env=env).returncode == 0
    conf = {
        "input_uri": f"s3://{bucket}/input/videos.jsonl",
        "output_prefix": f"s3://{bucket}/output",
        "media_root": f"s3://{bucket}/media/",
        "seed": 3,
        "rows_per_shard": 2,
        "max_frames": 8,
        "max_iterations": 1,
        "final_pairs": 3,
        "frames_per_clip": 2,
    }
    proc = airflow("dags", "test", "video_qa", "-c", json.dumps(conf), env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert log.count("starting the run's model server") == 1
    with sqlite3.connect(home / "airflow.db") as db:
        states = db.execute("SELECT task_id, map_index, state FROM task_instance WHERE dag_id='video_qa'").fetchall()
        server = json.loads(
            db.execute("SELECT value FROM xcom WHERE task_id='model_server' AND key='return_value'").fetchone()[0]
        )
    workers = [
        (task, index)
        for task, index, state in states
        if task in ("ingest", "initial", "multiagent", "final", "quality") and state == "success"
    ]
    assert len(workers) == 10 and ("stop_model_server", -1, "success") in states, states
    # one server process loaded the model once, and answered every stage; the teardown stopped it
    server_log = Path(server["log"]).read_text()
    assert server_log.count("Loading weights took") == 1, server_log[:3000]
    assert server_log.count("POST /v1/chat/completions") >= 10
    # stopped: gone, or (where the machine's init does not reap orphans) a zombie that no longer runs
    from vqa_operators.serving.vllm_server import _alive

    assert not _alive(server["pid"])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", int(server["base_url"].rsplit(":", 1)[1].split("/")[0]))) != 0
