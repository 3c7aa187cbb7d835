"""Store faults are the job's, never a row's: every stage on an S3 that throttles, fails and drops connections.

The store is moto behind ``testkit.s3_faults.S3FaultProxy``, which answers a share of requests
with SlowDown (503) or InternalError (500), drops connections before and after the server applied
the request, cuts answers off mid-body and delays others. Each stage's files must be what the
same stage writes on a store without faults: no good row in errors, none lost or written twice.
A definite answer (AccessDenied, a missing object) stays the row's; a fault that persists fails
the job with exit 5, and the retry resumes from the checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.data import MODEL, job_options
from testkit.openai_server import OpenAITestServer
from testkit.s3_faults import S3FaultProxy
from tests.real_vllm import write_inputs
from vqa_operators.exceptions import StorageError
from vqa_operators.merge import deduplicate_shards, finalize_run, merge_run
from vqa_operators.records import NearDuplicateSettings, Shard, StageManifest
from vqa_operators.sharding import plan_shards
from vqa_operators.storage import Storage

ROOT = Path(__file__).resolve().parents[2]
RATES = {"slowdown": 0.1, "internal": 0.1, "drop": 0.1, "drop_after": 0.04, "cut": 0.1, "slow": 0.04}
# stage -> (generator, where its input comes from, params): every worker stage, chained as the DAGs chain them
STAGES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "image_qa": ("image_qa", "in/image.jsonl", {"pairs_per_row": 2}),
    "quality": ("quality", "image_qa", {"source": "image_qa"}),
    "pers_qa": ("pers_qa", "in/pers.jsonl", {}),
    "video_ingest": ("video_ingest", "in/video.jsonl", {"clip_s": 2.0}),
    "video_qa_initial": ("video_qa_initial", "video_ingest", {}),
    "video_qa_multiagent": ("video_qa_multiagent", "video_qa_initial", {"max_iterations": 1}),
    "video_qa_final": ("video_qa_final", "video_qa_multiagent", {"final_pairs": 2}),
}
pytestmark = pytest.mark.usefixtures("fast_backoff", "fast_store_backoff")


@pytest.fixture
def fast_store_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto's pause before it attempts a throttled request again, a second and doubling, cut to 50 ms like its other pauses.

    Only the length of the pauses changes: which answers boto attempts again, how often, and its
    adaptive mode's slowing down are its own.
    """
    from botocore.retries import standard

    monkeypatch.setattr(
        standard.ExponentialBackoff, "_DEFAULT_BACKOFF_CONFIG", {"throttling_base_scale": 0.05, "non_throttling_base_scale": 0.05}
    )


@pytest.fixture
def shared(s3_env: str, s3: Any, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The inputs and media on the store (written without faults): ``s3://<bucket>/shared``."""
    folder = tmp_path_factory.mktemp("shared")
    inputs = write_inputs(folder, images=6, videos=2, video_files=1)
    for name, path in inputs.items():
        s3.put_object(Bucket=bucket, Key=f"shared/in/{name}.jsonl", Body=path.read_bytes())
    for medium in (folder / "media").iterdir():
        s3.put_object(Bucket=bucket, Key=f"shared/media/{medium.name}", Body=medium.read_bytes())
    return f"s3://{bucket}/shared"


@pytest.fixture
def faulty(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3FaultProxy]:
    """The fault proxy in front of the moto server, and this process's S3 endpoint set to it."""
    with S3FaultProxy(s3_env, RATES, seed=5, delay_s=0.2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield proxy


def run_stage(server: OpenAITestServer, folder: Path, shared: str, out: str, stage: str, **extra: Any) -> dict[str, Any]:
    from vqa_operators.worker import run_job

    generator, source, params = STAGES[stage]
    input_uri = f"{shared}/{source}" if source.startswith("in/") else f"{out}/{source}.jsonl"
    opts = job_options(
        server,
        folder,
        Path(input_uri),
        generator=generator,
        output=f"{out}/{stage}.jsonl",
        media_root=f"{shared}/media",
        params=params,
        concurrency=4,
        checkpoint_every=2,
        request_timeout=5.0,
        **extra,
    )
    opts.input = input_uri
    return run_job(opts, storage=Storage())


def files(out: str) -> dict[str, bytes]:
    """Every file under ``out`` (checkpoints aside), with ``out`` itself written as <out>: the rows, and the frames the ingest stored."""
    storage = Storage()  # an S3 listing is every key below the prefix
    return {
        uri.removeprefix(out + "/"): storage.read_bytes(uri).replace(out.encode(), b"<out>")
        for uri in storage.list(out + "/")
        if ".checkpoint/" not in uri
    }


def counts(manifest: Any) -> tuple[Any, ...]:
    return tuple(
        getattr(manifest, k)
        for k in ("rows_in", "rows_out", "rows_failed", "rows_rejected", "failures_by_reason", "pairs_kept", "requests")
    )


def test_every_stage_on_a_faulty_store_writes_what_it_writes_on_a_sound_one(
    vlm_server: OpenAITestServer, tmp_path: Path, shared: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = shared.removeprefix("s3://").split("/")[0]
    clean_out, faulty_out = f"s3://{bucket}/clean", f"s3://{bucket}/faulty"
    clean = {stage: run_stage(vlm_server, tmp_path / "clean", shared, clean_out, stage) for stage in STAGES}
    with S3FaultProxy(s3_env, RATES, seed=5, delay_s=0.2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        faulty = {stage: run_stage(vlm_server, tmp_path / "faulty", shared, faulty_out, stage) for stage in STAGES}
        # plan, dedup and merge too: the image_qa run split in two shards, deduplicated across them, merged
        storage = Storage()
        plan = plan_shards(storage, f"{shared}/in/image.jsonl", rows_per_shard=3)
        whole = [Shard(input=f"{shared}/in/image.jsonl", index=0, first_line=1, rows=6, start=0, end=plan[-1].end).model_dump()]
        merged = {}
        for out, manifests in ((faulty_out, faulty), (clean_out, clean)):
            deduplicated = deduplicate_shards(
                storage,
                [manifests["image_qa"]],
                whole,
                staging=f"{out}/merged",
                dedup=NearDuplicateSettings(near_duplicate_threshold=0.95),
            )
            merged[out] = merge_run(
                storage,
                {"generate": [manifests["image_qa"]], "dedup": deduplicated},
                output=f"{out}/merged/generate.jsonl",
                plan=whole,
            )
            # the preview (it reads the images back) and the manifest, last
            finalize_run(storage, merged[out], title="t", media_root=f"{shared}/media", allowed_roots=[shared])
        injected = dict(proxy.counts)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env)
    assert [(s.first_line, s.rows) for s in plan] == [(1, 3), (4, 3)]
    # every kind of fault was met, many times
    assert all(injected.get(kind, 0) >= 3 for kind in RATES), injected
    for stage in STAGES:
        assert counts(faulty[stage]) == counts(clean[stage]), stage
        assert faulty[stage].rows_reused == 0, stage  # the job never failed: the faults were all absorbed
    # the files: byte for byte what the sound store got (checkpoints aside)
    got, want = files(faulty_out), files(clean_out)
    assert got.keys() == want.keys()
    for name in want:
        if not name.endswith(".manifest.json"):  # the merged manifest holds the run's seconds
            assert got[name] == want[name], name
    assert merged[faulty_out].rows_out == merged[clean_out].rows_out == 6
    # a good row never went to errors, and the video frames the ingest wrote are all there
    assert clean["image_qa"].rows_failed == clean["video_qa_final"].rows_failed == 0
    assert clean["video_ingest"].rows_out == 3


def test_a_definite_answer_is_the_rows_and_a_fault_that_persists_fails_the_job_with_exit_5(
    vlm_server: OpenAITestServer, tmp_path: Path, shared: str, faulty: S3FaultProxy, s3_env: str
) -> None:
    bucket = shared.removeprefix("s3://").split("/")[0]
    out = f"s3://{bucket}/runs"
    # AccessDenied on one image: its row goes to errors as unreadable, the others are made
    faulty.denied = "/media/1.jpg"
    manifest = run_stage(vlm_server, tmp_path, shared, out, "image_qa")
    assert (manifest.rows_out, manifest.failures_by_reason) == (4, {"image_unreadable": 2})
    errors = [json.loads(line) for line in Storage().iter_lines(f"{out}/image_qa.errors.jsonl")]
    # row 0 shows images 0 and 1, row 1 image 1
    assert [e["row"]["id"] for e in errors] == [0, 1] and all("AccessDenied" in e["detail"] for e in errors)
    faulty.denied = None

    # a store that stays down for one image (and otherwise sound, so that 3 attempts are enough everywhere else):
    # the worker exits 5 (StorageError), and no row is blamed for it
    faulty.rates, faulty.persistent = {}, "/media/3.jpg"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'plugins'}",
        "VQA_S3_MAX_ATTEMPTS": "3",
        "AWS_ENDPOINT_URL_S3": faulty.url,
    }
    argv = [
        sys.executable,
        "-m",
        "vqa_operators",
        "run",
        "image_qa",
        "--input",
        f"{shared}/in/image.jsonl",
        "--output",
        f"{out}/down.jsonl",
        "--base-url",
        vlm_server.base_url,
        "--model",
        MODEL,
        "--media-root",
        f"{shared}/media",
        "--concurrency",
        "1",
        "--checkpoint-every",
        "1",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == StorageError.exit_code == 5, proc.stderr[-2000:]
    assert "StorageError" in proc.stderr and "3.jpg" in proc.stderr and "SlowDown" in proc.stderr, proc.stderr[-2000:]
    assert not Storage().exists(f"{out}/down.jsonl") and not Storage().exists(f"{out}/down.errors.jsonl")

    # the store recovers; the retry resumes: the rows finished before (lines 1-3, and those after line 4 that ran while
    # it was failing) are reused, line 4 and any other asked for once each, and nothing is in errors
    faulty.persistent = None
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    retried = StageManifest.model_validate_json(proc.stdout.strip().splitlines()[-1])
    assert (retried.rows_out, retried.rows_failed) == (6, 0) and 3 <= retried.rows_reused <= 5
    assert retried.requests == 6 - retried.rows_reused
