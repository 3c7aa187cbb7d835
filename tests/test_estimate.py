"""An estimate before the spend: a sample of the input through every stage, projected to the whole input, on the double."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest

from testkit.data import job_options, write_image_rows
from testkit.openai_server import OpenAITestServer
from testkit.verdicts import ScriptedVerdicts
from vqa_operators.merge import deduplicate_shards, merge_run
from vqa_operators.records import NearDuplicateSettings
from vqa_operators.sharding import plan_shards
from vqa_operators.storage import Storage
from vqa_operators.worker import run_job

ROWS = 40


def run(
    server: OpenAITestServer, folder: Path, source: Path, name: str, *, sample: int | None, requests_per_s: float | None = None
) -> dict[str, Any]:
    """The image_qa DAG's stages by hand (plan, generate per shard, dedup, quality per shard, merge), under ``folder/name``."""
    staging = folder / name
    plan = plan_shards(Storage(), str(source), rows_per_shard=4 if sample else 20, sample=sample)
    stages: dict[str, list[dict[str, Any]]] = {"generate": [], "quality": []}
    for shard in plan:
        out = staging / "generate" / f"shard-{shard.index:05d}.jsonl"
        stages["generate"].append(
            run_job(
                job_options(
                    server,
                    folder,
                    source,
                    output=str(out),
                    shard=shard,
                    task_key=f"{name}-g{shard.index}",
                    params={"pairs_per_row": 2},
                )
            )
        )
    # off: the double's questions of same-sized images are near-duplicates of one another, and how many are depends on the rows seen
    dedup = deduplicate_shards(
        Storage(),
        stages["generate"],
        [s.model_dump() for s in plan],
        staging=str(staging),
        dedup=NearDuplicateSettings(remove_near_duplicates=False),
    )
    for shard in plan:
        out = staging / "quality" / f"shard-{shard.index:05d}.jsonl"
        stages["quality"].append(
            run_job(
                job_options(
                    server,
                    folder,
                    staging / "dedup" / f"shard-{shard.index:05d}.jsonl",
                    generator="quality",
                    output=str(out),
                    shard=shard,
                    task_key=f"{name}-q{shard.index}",
                    params={"source": "image_qa"},
                )
            )
        )
    return merge_run(
        Storage(),
        {"generate": stages["generate"], "dedup": dedup, "quality": stages["quality"]},
        output=str(staging / "generate.jsonl"),
        plan=[s.model_dump() for s in plan],
        requests_per_s=requests_per_s,
    )


@pytest.mark.usefixtures("fast_backoff")
def test_an_estimate_from_a_sample_lies_within_10_percent_of_the_real_runs_requests(
    vlm_server: OpenAITestServer, tmp_path: Path
) -> None:
    source = write_image_rows(tmp_path, ROWS)
    # a pair in four fails grounding: the acceptance rate, and the judge's calls, are the real run's too
    vlm_server.verdicts = ScriptedVerdicts(score=lambda q, a: 2 if zlib.crc32(q.encode()) % 4 == 0 else 5)
    estimated = run(vlm_server, tmp_path, source, "estimate", sample=8, requests_per_s=4.0)
    sample_requests = len(vlm_server.requests)
    vlm_server.requests.clear()
    real = run(vlm_server, tmp_path, source, "real", sample=None)

    estimate = estimated.estimate
    assert real.estimate is None and (estimate.sample_rows, estimate.input_rows) == (8, ROWS)
    assert estimated.rows_in == 8 and sample_requests == estimated.requests
    # every call the sample made, per row: 1 to generate, 3 to judge each of its 2 pairs
    assert estimate.per_row.requests == 7.0 and estimate.per_kept_pair == estimated.cost_per_kept_pair
    projected = estimate.projected
    assert abs(projected.requests - real.requests) <= 0.1 * real.requests, (projected, real.requests)
    assert abs(projected.completion_tokens - real.completion_tokens) <= 0.1 * real.completion_tokens
    assert abs(projected.pairs_kept - real.pairs_kept) <= 0.1 * real.pairs_kept + 2
    # hours at the given throughput
    assert estimate.throughput == "given" and estimate.server_hours == round(projected.requests / 4.0 / 3600, 3)


def test_an_estimate_without_a_given_throughput_uses_the_samples(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    source = write_image_rows(tmp_path, 12)
    estimated = run(vlm_server, tmp_path, source, "estimate", sample=4)
    estimate = estimated.estimate
    seconds = sum(s.slowest_shard_s for s in estimated.stages.values() if s.requests)
    assert estimate.throughput == "measured on the sample" and estimate.requests_per_s == round(estimated.requests / seconds, 3)
    assert estimate.projected.requests == round(estimated.requests * 12 / 4)
