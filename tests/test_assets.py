"""The dataset's asset event: what merge puts on it, and when it carries a partition (the browser tier runs a real consumer)."""

from __future__ import annotations

import pendulum
import pytest
from airflow.sdk.execution_time.context import OutletEventAccessors

from vqa_operators.assets import EVENT_KEYS, dataset_asset, event_extra, published
from vqa_operators.operators.fanout import VQAMergeOperator
from vqa_operators.records import RunManifest, StageSummary

RUN = "s3://b/out/image_qa/r1"


def stage(generator: str | None, errors: str | None, **counts: int) -> StageSummary:
    return StageSummary(
        kind="generator" if generator else "dedup",
        generator=generator,
        shards=1,
        output=None,
        errors=errors,
        rejected=None,
        model="m" if generator else None,
        prompt_sha256="ab" if generator else None,
        seed=None,
        slowest_shard_s=1.0,
        **{"rows_in": 10, "rows_out": 10, "rows_failed": 0, **counts},
    )


MANIFEST = RunManifest(
    dag_id="image_qa",
    run_id="r1",
    generator="image_qa",
    shards=1,
    input="s3://b/raw/in.jsonl",
    output=f"{RUN}/generate.jsonl",
    errors={"generate": f"{RUN}/generate.errors.jsonl", "quality": f"{RUN}/quality.errors.jsonl"},
    rejected=f"{RUN}/generate.rejected.jsonl",
    manifest=f"{RUN}/generate.manifest.json",
    preview=f"{RUN}/generate.preview.html",
    rows_in=10,
    rows_out=7,
    rows_failed=1,
    rows_rejected=2,
    pairs_kept=20,
    pairs_rejected=8,
    acceptance_rate=0.7143,
    exports={"parquet": f"{RUN}/generate.parquet"},
    estimate=None,
    requests=99,
    near_duplicates=None,
    quality_scores=None,
    cost_per_kept_pair=None,
    stages={
        "generate": stage("image_qa", f"{RUN}/generate.errors.jsonl"),
        "dedup": stage(None, None),
        "quality": stage("quality", f"{RUN}/quality.errors.jsonl", rows_failed=1),
    },
)


def announce(logical_date: pendulum.DateTime | None) -> OutletEventAccessors:
    merge = VQAMergeOperator(
        task_id="merge", stages={}, output_uri="s3://b/x.jsonl", plan=[], outlets=[dataset_asset("image_qa")]
    )
    events = OutletEventAccessors()
    context = {"outlet_events": events, "logical_date": logical_date}
    if logical_date is not None:
        context["ds"] = logical_date.to_date_string()
    merge.announce(context, MANIFEST)
    return events


def test_the_event_carries_the_counts_and_uris_and_nothing_else() -> None:
    event = announce(None)[dataset_asset("image_qa")]
    assert event.extra == event_extra(MANIFEST)
    assert set(event.extra) == {*EVENT_KEYS, "stages"} and "requests" not in event.extra
    assert (event.extra["dag_id"], event.extra["generator"], event.extra["rows_out"]) == ("image_qa", "image_qa", 7)
    # every stage: what made it, and where its failed rows are
    assert event.extra["errors"] == {"generate": f"{RUN}/generate.errors.jsonl", "quality": f"{RUN}/quality.errors.jsonl"}
    assert event.extra["stages"] == {
        "generate": {
            "kind": "generator",
            "generator": "image_qa",
            "model": "m",
            "prompt_sha256": "ab",
            "errors": f"{RUN}/generate.errors.jsonl",
        },
        "dedup": {"kind": "dedup", "generator": None, "model": None, "prompt_sha256": None, "errors": None},
        "quality": {
            "kind": "generator",
            "generator": "quality",
            "model": "m",
            "prompt_sha256": "ab",
            "errors": f"{RUN}/quality.errors.jsonl",
        },
    }
    assert event.partition_keys == set()


@pytest.mark.parametrize(
    ("setting", "dated", "keys"), [("true", True, {"2026-01-05"}), ("true", False, set()), ("", True, set())]
)
def test_a_partition_only_when_asked_and_only_for_runs_with_a_date(
    monkeypatch: pytest.MonkeyPatch, setting: str, dated: bool, keys: set[str]
) -> None:
    monkeypatch.setenv("VQA_ASSET_PARTITIONS", setting)
    event = announce(pendulum.datetime(2026, 1, 5, tz="UTC") if dated else None)[dataset_asset("image_qa")]
    assert event.partition_keys == keys and event.extra["rows_out"] == 7


def test_a_consumer_reads_each_event_it_was_started_for() -> None:
    class Event:
        def __init__(self, run_id: str, rows_out: int) -> None:
            self.source_dag_id, self.source_run_id, self.partition_key = "image_qa", run_id, None
            self.extra = {**event_extra(MANIFEST), "rows_out": rows_out}

    found = published({dataset_asset("image_qa"): [Event("r2", 5), Event("r1", 7)]})
    assert [(d["asset"], d["source_run_id"], d["rows_out"], d["output"]) for d in found] == [
        ("vqa.image_qa", "r1", 7, MANIFEST.output),
        ("vqa.image_qa", "r2", 5, MANIFEST.output),
    ]
