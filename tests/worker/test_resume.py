"""Resume on retry: checkpointed rows are reused, the output is whole and written once, settings changes start afresh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.data import MODEL, job_options, read_rows, row_seeds, write_image_rows
from testkit.openai_server import OpenAITestServer, outage_after
from tests.helpers import checkpointed_rows, wait_for_progress
from vqa_operators.exceptions import ServerUnavailableError
from vqa_operators.generators.image_qa import ImageQAGenerator
from vqa_operators.records import Finished
from vqa_operators.seed_compat.serving import APIVLMServing_openai
from vqa_operators.storage import Storage
from vqa_operators.storage.checkpoint import Checkpoint, checkpoint_prefix
from vqa_operators.worker import JobOptions, run_job, settings_fingerprint

ROOT = Path(__file__).resolve().parents[2]
N = 24
pytestmark = pytest.mark.usefixtures("fast_backoff")


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the output and its checkpoint live: a folder, or a bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    bucket = request.getfixturevalue("bucket")
    assert s3 is not None
    return f"s3://{bucket}/out"


def read_uri(uri: str) -> bytes:
    storage = Storage()
    return storage.read_bytes(uri) if storage.exists(uri) else b""


def test_a_failed_try_is_resumed_with_fewer_calls_and_the_same_output(
    vlm_server: OpenAITestServer, tmp_path: Path, place: str
) -> None:
    source = write_image_rows(tmp_path, N)
    (tmp_path / "in.jsonl").write_text((tmp_path / "in.jsonl").read_text() + "{broken\n")  # a bad line is accounted for too
    clean = run_job(job_options(vlm_server, tmp_path, source, output=f"{place}/clean.jsonl"))
    clean_bytes = read_uri(f"{place}/clean.jsonl"), read_uri(f"{place}/clean.errors.jsonl")
    vlm_server.reset()

    vlm_server.responder = outage_after(10)
    opts = job_options(
        vlm_server, tmp_path, source, output=f"{place}/rows.jsonl", concurrency=2, checkpoint_every=3, max_consecutive_failures=4
    )
    with pytest.raises(ServerUnavailableError) as failed:
        run_job(opts)
    assert not Storage().exists(f"{place}/rows.jsonl") and not Storage().exists(f"{place}/rows.errors.jsonl")
    vlm_server.reset()  # the server is back
    # ten answers were served; the job fails as soon as the outage is certain, so an answer still
    # being read for the other request in flight (concurrency 2) may be dropped with its row
    finished = failed.value.progress.rows_finished
    assert finished in (9, 10)

    manifest = run_job(opts)
    # every row the failed try finished, and only those, is reused
    assert manifest.rows_reused == finished and manifest.requests == N - finished
    assert (manifest.rows_in, manifest.rows_out, manifest.rows_failed) == (N + 1, N, 1)
    # byte for byte what an uninterrupted run wrote: complete, in order, no duplicates
    assert (read_uri(f"{place}/rows.jsonl"), read_uri(f"{place}/rows.errors.jsonl")) == clean_bytes
    assert clean.requests == N
    print(
        f"\nresume ({place}): {manifest.rows_reused} of {N} rows reused; calls saved {1 - manifest.requests / clean.requests:.0%}"
    )


def test_a_rerun_after_success_is_a_no_op(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    source = write_image_rows(tmp_path, 8)
    opts = job_options(vlm_server, tmp_path, source)
    first = run_job(opts)
    out, errors = tmp_path / "out" / "rows.jsonl", tmp_path / "out" / "rows.errors.jsonl"
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (out, errors)]
    parts = sorted((tmp_path / "out").glob("rows.checkpoint/**/part-*"))
    vlm_server.reset()

    again = run_job(opts)
    assert (again.requests, again.rows_reused, again.rows_out) == (0, 8, first.rows_out)
    assert vlm_server.requests == []
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (out, errors)] == stamps  # not rewritten
    assert sorted((tmp_path / "out").glob("rows.checkpoint/**/part-*")) == parts  # no new checkpoint part


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.1},
        {"top_p": 0.5},
        {"max_tokens": 512},
        {"seed": 4},
        {"params": {"pairs_per_row": 3}},
        {"max_pixels": 50_000},
    ],
    ids=["temperature", "top_p", "max_tokens", "seed", "options", "image-budget"],
)
def test_changed_settings_are_not_reused(vlm_server: OpenAITestServer, tmp_path: Path, change: dict) -> None:
    source = write_image_rows(tmp_path, 6)
    run_job(job_options(vlm_server, tmp_path, source))
    vlm_server.reset()
    manifest = run_job(job_options(vlm_server, tmp_path, source, **change))
    assert (manifest.rows_reused, manifest.requests) == (0, 6)


def test_fingerprint_covers_model_and_prompt_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators import prompts as prompts_module
    from vqa_operators.generators import base

    opts = JobOptions(generator="image_qa", input="i.jsonl", output="o.jsonl")

    def fingerprint_with(model: str) -> str:
        return settings_fingerprint(ImageQAGenerator(APIVLMServing_openai(api_url="http://x/v1", model_name=model)), opts)

    assert fingerprint_with("model-a") == fingerprint_with("model-a") != fingerprint_with("model-b")
    # the same templates with one word changed
    edited = tmp_path / "prompts"
    for source in (prompts_module.prompts_dir()).rglob("*.j2"):
        target = edited / source.relative_to(prompts_module.prompts_dir())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    user = edited / "image_qa" / "user.j2"
    user.write_text(user.read_text() + "\nBe brief.")
    baseline = fingerprint_with("model-a")
    monkeypatch.setattr(base, "load_prompts", lambda name: prompts_module.load_prompts(name, root=str(edited)))
    assert fingerprint_with("model-a") != baseline


def test_identical_rows_are_each_kept(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    source = write_image_rows(tmp_path, 1)
    source.write_text(source.read_text() * 3)
    opts = job_options(vlm_server, tmp_path, source)
    assert run_job(opts).rows_out == 3
    again = run_job(opts)
    assert (again.rows_out, again.rows_reused, again.requests) == (3, 3, 0)
    assert len(read_rows(tmp_path / "out" / "rows.jsonl")) == 3


def test_the_task_identity_names_the_checkpoint(tmp_path: Path) -> None:
    prefix = checkpoint_prefix(
        "s3://b/out/video_qa/run/final.jsonl", "video_qa/final/manual__2026-11-22T10:00:00+00:00/-1", "abc123"
    )
    assert prefix == "s3://b/out/video_qa/run/final.checkpoint/video_qa/final/manual__2026-11-22T10:00:00+00:00/-1/abc123/"
    assert checkpoint_prefix(str(tmp_path / "o.jsonl"), None, "f") == f"{tmp_path}/o.checkpoint/cli/f/"
    assert "/a_b/" in checkpoint_prefix("o.jsonl", "a b/x", "f")  # path-unsafe characters are replaced


def test_overlapping_writers_never_overwrite_each_others_parts(tmp_path: Path) -> None:
    storage = Storage()
    prefix = f"{tmp_path}/o.checkpoint/cli/f/"
    first, second = Checkpoint(storage, prefix, every_rows=2), Checkpoint(storage, prefix, every_rows=2)
    for i in range(4):
        first.add(f"{i}:a", Finished(out={"by": "first", "i": i}))
        second.add(f"{i + 2}:a", Finished(out={"by": "second", "i": i + 2}))
    assert len(list(Path(prefix).glob("part-*"))) == 4
    reader = Checkpoint(storage, prefix)
    assert reader.load() == 6  # keys 2 and 3 were finished by both; either record is the row's
    assert reader.get("0:a") == Finished(out={"by": "first", "i": 0})
    assert reader.get("5:a").out["by"] == "second"
    for checkpoint in (first, second, reader):
        checkpoint.close()


def test_sigkill_mid_run_then_rerun(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    rows = 40
    source = write_image_rows(tmp_path, rows)
    later = {seed for row, seed in row_seeds(source, 1).items() if row >= 12}
    vlm_server.hold(
        lambda body: body.get("seed") in later
    )  # rows 0-11 are answered, the rest wait: the kill always lands mid-run
    output = tmp_path / "out" / "rows.jsonl"
    argv = [
        sys.executable,
        "-m",
        "vqa_operators",
        "run",
        "image_qa",
        "--input",
        str(source),
        "--output",
        str(output),
        "--media-root",
        str(tmp_path / "media"),
        "--concurrency",
        "2",
        "--seed",
        "1",
        "--checkpoint-every",
        "3",
        "--param",
        "pairs_per_row=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"), "VQA_BASE_URL": vlm_server.base_url, "VQA_MODEL": MODEL}
    worker = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # a row is checkpointed (every 3) as it finishes, before its progress line: 12 reported is 12 saved
        wait_for_progress(worker.stderr, "image_qa", 12)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        worker.kill()
        vlm_server.release()
    assert worker.returncode == -signal.SIGKILL
    saved = checkpointed_rows(output.parent)
    assert saved == 12
    assert not output.exists() and not output.with_name("rows.errors.jsonl").exists()  # nothing partial at the keys
    first_calls = len(vlm_server.requests)
    vlm_server.reset()

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert manifest["rows_reused"] == saved and manifest["requests"] == rows - saved
    assert f"{saved} reused from earlier tries" in rerun.stderr
    out = read_rows(output)
    assert [r["id"] for r in out] == list(range(rows))  # complete, in order, no duplicates
    print(f"\nSIGKILL after {first_calls} calls; rerun made {manifest['requests']} calls for {rows} rows ({saved} reused)")


def test_one_rule_decides_a_finished_record_for_the_writer_and_the_loader(tmp_path: Path) -> None:
    from pydantic import ValidationError

    rejected = [
        {
            "stage": "quality",
            "line": 2,
            "index": 0,
            "pair": {"question": "q", "answer": "a"},
            "reason": "not_grounded",
            "detail": "score 1",
            "verdicts": None,
            "row_rejected": False,
            "row": {"id": 2},
        }
    ]
    kinds = {
        "kept": Finished(out={"id": 1}),
        "judged": Finished(out={"id": 2}, pairs_kept=1, rejected=rejected),
        "rejected": Finished(pairs_kept=0, rejected=rejected),
        "failed": Finished(error={"stage": "image_qa", "line": 4, "reason": "bad_field", "detail": "x", "row": {"id": 4}}),
    }
    assert [r.kind for r in kinds.values()] == ["kept", "kept", "rejected", "failed"]
    for broken in (
        {"out": {}, "error": {"reason": "x"}},
        {},
        {"pairs_kept": 0},
        {"out": {}, "pairs_kept": 0},
        {"error": {"detail": "no reason"}},
        {"pairs_kept": 0, "rejected": [{"pair": {}}]},
        {"out": {}, "extra": 1},
    ):
        with pytest.raises(ValidationError):
            Finished.model_validate(broken)
    prefix = str(tmp_path / "ck") + "/"
    written = Checkpoint(Storage(), prefix)
    for key, record in kinds.items():
        written.add(key, record)
    written.flush()
    written.close()
    # a line no writer of this rule made is skipped, not reused
    (tmp_path / "ck" / "part-0-other-000001.jsonl").write_text(
        json.dumps({"key": "both", "out": {}, "error": {"reason": "x"}}) + "\n"
    )
    loaded = Checkpoint(Storage(), prefix)
    assert loaded.load() == 4
    assert {key: loaded.get(key) for key in kinds} == kinds and loaded.get("both") is None
    loaded.close()
