"""Model-server faults: Retry-After, bounded retries with jittered backoff, repairs, and failing fast on an outage."""

from __future__ import annotations

import asyncio
import email.utils
import time
from pathlib import Path

import pytest

from testkit.data import MODEL, job_options, read_rows, write_image_rows
from testkit.openai_server import FAULTS, OpenAITestServer, Reply, outage_after
from tests.helpers import checkpointed_rows
from vqa_operators.exceptions import ServerUnavailableError
from vqa_operators.serving import openai_api
from vqa_operators.serving.base import ChatRequest
from vqa_operators.serving.openai_api import OpenAIServing, redact_url, retry_after
from vqa_operators.worker import JobOptions, run_job

pytestmark = pytest.mark.usefixtures("fast_backoff")
REQUEST = ChatRequest(messages=[{"role": "user", "content": "hi"}], schema={"type": "object"}, schema_name="X")
CONTENT_REASONS = {"truncated_output", "invalid_json", "schema_mismatch"}


def test_retry_after_header_forms() -> None:
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after({"retry-after": future}) <= 30
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


def test_429_waits_as_asked_and_does_not_count_as_an_outage(vlm_server: OpenAITestServer) -> None:
    vlm_server.enqueue(*[Reply(status=429, headers={"Retry-After": "0.4"})] * 3)
    client = OpenAIServing(base_url=vlm_server.base_url, model=MODEL, concurrency=8, max_retries=3, max_consecutive_failures=2)
    start = time.monotonic()
    assert asyncio.run(client.chat(REQUEST)).text
    assert time.monotonic() - start >= 1.2  # three waits of 0.4 s, as the server asked
    assert len(vlm_server.requests) == 4


def test_backoff_grows_with_jitter_and_is_bounded(vlm_server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def record(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(openai_api.asyncio, "sleep", record)
    vlm_server.enqueue(*[Reply(status=503)] * 5)
    client = OpenAIServing(
        base_url=vlm_server.base_url,
        model=MODEL,
        concurrency=8,
        max_retries=4,
        retry_base_delay=1.0,
        max_consecutive_failures=100,
    )
    with pytest.raises(ServerUnavailableError, match="still failing after 4 retries: HTTP 503"):
        asyncio.run(client.chat(REQUEST))
    assert len(waits) == 4 and len(vlm_server.requests) == 5  # bounded: 1 try + 4 retries
    for attempt, wait in enumerate(waits):
        ceiling = 2.0**attempt
        assert ceiling / 2 <= wait <= ceiling  # equal jitter: half fixed, half random
    assert len(set(waits)) == 4


@pytest.mark.parametrize("fault", ["500", "503", "drop", "timeout"])
def test_transient_faults_are_retried(vlm_server: OpenAITestServer, fault: str) -> None:
    vlm_server.enqueue(FAULTS[fault], FAULTS[fault])
    # only the hang needs a timeout shorter than itself (3 s); a short one elsewhere would turn a slow answer on a loaded
    # machine into one more retry than the faults asked for
    timeout = 1.5 if fault == "timeout" else 30.0
    client = OpenAIServing(
        base_url=vlm_server.base_url, model=MODEL, concurrency=8, max_retries=3, timeout=timeout, retry_base_delay=0.01
    )
    assert asyncio.run(client.chat(REQUEST)).text
    assert len(vlm_server.requests) == 3


def test_an_outage_fails_the_job_fast_and_marks_no_row_failed(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    source = write_image_rows(tmp_path, 30)
    vlm_server.responder = outage_after(6)
    opts = job_options(
        vlm_server, tmp_path, source, max_retries=20, max_consecutive_failures=5, concurrency=2, checkpoint_every=1000
    )
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=r"is down: 5 consecutive failures, the last: APIConnectionError") as info:
        run_job(opts)
    assert time.monotonic() - start < 10  # not 30 rows x 20 retries
    # 5 failures in a row trip it; a success racing the first failures may reset the count once
    assert len(vlm_server.requests) <= 6 + 2 * 5 + 2
    # no output and no errors file: an outage is not the rows' fault
    assert not (tmp_path / "out" / "rows.jsonl").exists() and not (tmp_path / "out" / "rows.errors.jsonl").exists()
    # every row the try finished is checkpointed on the way out. Six were answered; an answer still in
    # flight when the outage is declared is dropped with its row. At concurrency 2 that is at most one:
    # the failing requests (the 7th on) only start once one of the two slots is free.
    finished = info.value.progress.rows_finished
    assert checkpointed_rows(tmp_path / "out") == finished and 5 <= finished <= 6


def test_a_dead_server_fails_before_any_row(tmp_path: Path) -> None:
    source = write_image_rows(tmp_path, 3)
    opts = JobOptions(
        generator="image_qa",
        input=str(source),
        output=str(tmp_path / "o.jsonl"),
        base_url="http://127.0.0.1:9/v1",
        model=MODEL,
        media_root=str(tmp_path / "media"),
        max_retries=20,
        max_consecutive_failures=3,
    )
    with pytest.raises(ServerUnavailableError, match="is down: 3 consecutive failures"):
        run_job(opts)


MIXES = {
    "transient": {"429": 0.08, "500": 0.08, "503": 0.08, "drop": 0.08, "timeout": 0.04},
    "content": {"truncated": 0.1, "invalid_json": 0.1, "schema_mismatch": 0.1},
    "everything": {
        "429": 0.05,
        "500": 0.05,
        "503": 0.05,
        "drop": 0.05,
        "timeout": 0.03,
        "truncated": 0.05,
        "invalid_json": 0.05,
        "schema_mismatch": 0.05,
    },
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_every_row_is_accounted_for_under_a_fault_mix(vlm_server: OpenAITestServer, tmp_path: Path, mix: str) -> None:
    n = 40
    source = write_image_rows(tmp_path, n)
    vlm_server.inject(MIXES[mix], seed=7)
    manifest = run_job(job_options(vlm_server, tmp_path, source, max_consecutive_failures=50))
    out, errors = read_rows(tmp_path / "out" / "rows.jsonl"), read_rows(tmp_path / "out" / "rows.errors.jsonl")
    ids = [r["id"] for r in out] + [e["row"]["id"] for e in errors]
    assert sorted(ids) == list(range(n))  # each row exactly once, in output or errors
    assert [r["id"] for r in out] == sorted(r["id"] for r in out)  # input order kept
    assert manifest.rows_in == n and manifest.rows_out == len(out) and manifest.rows_failed == len(errors)
    assert sum(vlm_server.injected.values()) > 0
    if mix == "transient":
        assert errors == []  # retries absorb every transient fault
    for entry in errors:  # only spoiled content, twice in a row, sends a row to errors
        assert entry["reason"] in CONTENT_REASONS and entry["raw_output"] and "after one repair" in entry["detail"]
    assert manifest.repairs >= len(errors)


def test_urls_lose_their_credentials_in_messages() -> None:
    assert redact_url("http://user:pw@vllm:8000/v1") == "http://***@vllm:8000/v1"
    assert redact_url("http://vllm:8000/v1") == "http://vllm:8000/v1"
    client = OpenAIServing(base_url="http://u:secret-pw@127.0.0.1:9/v1", model=MODEL, concurrency=8, max_retries=0)
    with pytest.raises(ServerUnavailableError) as info:
        asyncio.run(client.chat(REQUEST))
    assert "secret-pw" not in str(info.value) and "secret-pw" not in repr(client)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("truncated", "truncated_output"), ("invalid_json", "invalid_json"), ("schema_mismatch", "schema_mismatch")],
)
def test_bad_output_gets_one_repair_then_goes_to_errors(
    vlm_server: OpenAITestServer, tmp_path: Path, fault: str, reason: str
) -> None:
    source = write_image_rows(tmp_path, 2)
    vlm_server.enqueue(FAULTS[fault], FAULTS[fault], FAULTS[fault])  # one row: bad twice; the other: bad, then repaired
    manifest = run_job(job_options(vlm_server, tmp_path, source, concurrency=1))
    out, errors = read_rows(tmp_path / "out" / "rows.jsonl"), read_rows(tmp_path / "out" / "rows.errors.jsonl")
    assert sorted([r["id"] for r in out] + [e["row"]["id"] for e in errors]) == [0, 1]
    assert [e["reason"] for e in errors] == [reason] and len(out) == 1
    assert (manifest.requests, manifest.repairs) == (4, 2)
    repairs = [r["messages"][-1]["content"] for r in vlm_server.requests if isinstance(r["messages"][-1]["content"], str)]
    assert len(repairs) == 2 and all(("max_tokens" in text) == (fault == "truncated") for text in repairs)
