"""The operators' ``execute``, called as Airflow calls it, on local files and the test double: the thin adapters over the worker and the merge."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.execution_time.context import OutletEventAccessors

from testkit.data import MODEL, job_options, read_rows, write_image_rows
from testkit.openai_server import OpenAITestServer
from vqa_operators.assets import dataset_asset, event_extra
from vqa_operators.records import RunManifest, StageManifest
from vqa_operators.sharding import plan_shards
from vqa_operators.storage.uris import Storage
from vqa_operators.worker import run_job

os.environ.setdefault("AIRFLOW_HOME", "/tmp/vqa-operators-test")


def test_the_worker_operator_runs_its_generator_in_process_and_returns_the_manifest_only(
    vlm_server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vqa_operators.operators import VQAWorkerOperator, WorkerSpec

    monkeypatch.setenv(
        "AIRFLOW_CONN_VQA_VLM",
        json.dumps({"conn_type": "http", "host": vlm_server.base_url, "password": "sk-op", "extra": {"model": MODEL}}),
    )
    source = write_image_rows(tmp_path, 5)
    output = tmp_path / "run" / "generate.jsonl"
    spec = WorkerSpec(
        generator="image_qa",
        input=str(source),
        output=str(output),
        media_root=str(tmp_path / "media"),
        seed=2,
        params={"pairs_per_row": 2},
        staging_root=None,
        task_key="image_qa/generate/r1/-1",
        try_number=1,
    )
    operator = VQAWorkerOperator(task_id="generate", spec=spec, aws_conn_id=None)
    returned = operator.execute({"ti": SimpleNamespace(try_number=1, max_tries=3)})
    # XCom gets the manifest, as JSON (the rows stay in the files)
    manifest = StageManifest.model_validate_json(json.dumps(returned))
    assert (manifest.generator, manifest.rows_in, manifest.rows_out, manifest.rows_failed, manifest.pairs_out) == (
        "image_qa",
        5,
        5,
        0,
        10,
    )
    assert manifest.model == MODEL and manifest.try_number == 1 and manifest.output == str(output)
    assert len(read_rows(output)) == 5 and "rows" not in returned
    # the connection's key reached the server, and no secret is in what the task returns
    assert set(vlm_server.authorizations) == {"Bearer sk-op"} and "sk-op" not in json.dumps(returned)


def test_the_merge_operator_merges_finalizes_and_announces_the_dataset_with_the_manifest_last(
    vlm_server: OpenAITestServer, tmp_path: Path
) -> None:
    from vqa_operators.operators import VQAMergeOperator

    source = write_image_rows(tmp_path, 6)
    with source.open("a") as handle:
        handle.write("not json\n")
    plan = plan_shards(Storage(), str(source), rows_per_shard=4)
    run = tmp_path / "run"
    made = [
        run_job(
            job_options(
                vlm_server,
                tmp_path,
                source,
                output=str(run / "generate" / f"shard-{s.index:05d}.jsonl"),
                shard=s,
                task_key=f"g{s.index}",
            )
        ).dump()
        for s in plan
    ]
    merge = VQAMergeOperator(
        task_id="merge",
        stages={"generate": made},
        output_uri=str(run / "generate.jsonl"),
        plan=[s.dump() for s in plan],
        media_root=str(tmp_path / "media"),
        export={"export_formats": ["llava", "parquet"], "copy_media": True, "embed_images": False},
        aws_conn_id=None,
        outlets=[dataset_asset("image_qa")],
    )
    events = OutletEventAccessors()
    returned = merge.execute(
        {"dag": SimpleNamespace(dag_id="image_qa"), "run_id": "r1", "outlet_events": events, "logical_date": None}
    )

    manifest = RunManifest.model_validate(returned)
    written = RunManifest.model_validate_json((run / "generate.manifest.json").read_text())
    assert written == manifest
    assert (manifest.dag_id, manifest.run_id, manifest.generator) == ("image_qa", "r1", "image_qa")
    assert (manifest.rows_in, manifest.rows_out, manifest.rows_failed, manifest.shards) == (7, 6, 1, 2)
    assert (
        manifest.errors == {"generate": str(run / "generate.errors.jsonl")} and len(read_rows(run / "generate.errors.jsonl")) == 1
    )
    # the preview and the exports exist, and the manifest that names them was written after them
    named = [Path(manifest.preview), *(Path(uri) for uri in manifest.exports.values())]
    assert set(manifest.exports) == {"llava", "parquet", "media", "card"} and all(path.exists() for path in named)
    last = (run / "generate.manifest.json").stat().st_mtime_ns
    assert all(path.stat().st_mtime_ns <= last for path in named if path.is_file())
    # the asset event carries the dataset's counts and every stage's errors file
    extra = events[dataset_asset("image_qa")].extra
    assert (
        extra == event_extra(manifest)
        and extra["errors"] == manifest.errors
        and extra["stages"]["generate"]["errors"] == manifest.errors["generate"]
    )
