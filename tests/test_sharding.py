"""Sharded fan-out: the plan covers every line once, workers read only their range, the merge loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testkit.data import job_options, read_rows, write_image_rows
from vqa_operators.exceptions import InputError
from vqa_operators.merge import finalize_run, merge_run
from vqa_operators.settings import MAX_SHARDS_LIMIT
from vqa_operators.sharding import plan_shards
from vqa_operators.storage import Storage
from vqa_operators.storage.jsonl import read_jsonl
from vqa_operators.worker import run_job


def lines_of(storage: Storage, uri: str, shard) -> list[tuple[int, object]]:
    return list(
        read_jsonl(storage.iter_lines(uri, start=shard.start, end=shard.end, version=shard.version), first_line=shard.first_line)
    )


@pytest.mark.parametrize(
    ("rows", "per_shard", "max_shards", "sizes"),
    [
        (10, 3, 16, [3, 3, 3, 1]),
        (9, 3, 16, [3, 3, 3]),
        (10, 1, 3, [4, 4, 2]),  # the cap groups shards
        (1000, 1, 4, [256, 256, 256, 232]),  # the step doubles while reading, then groups
        (0, 5, 4, [0]),  # an empty input is one empty shard
        (5, 100, 4, [5]),
    ],
)
def test_the_plan_covers_every_line_once(tmp_path: Path, rows: int, per_shard: int, max_shards: int, sizes: list[int]) -> None:
    source = tmp_path / "in.jsonl"
    # mixed line endings, a blank line and a line without its final newline
    lines = [json.dumps({"id": i, "text": "é" * (i % 7)}) + ("\r\n" if i % 3 == 0 else "\n") for i in range(rows)]
    if rows > 3:
        lines[2] = "\n"
    text = "".join(lines)
    source.write_text(text[:-1] if text.endswith("\n") and rows % 2 else text, encoding="utf-8")
    storage = Storage()
    plan = plan_shards(storage, str(source), rows_per_shard=per_shard, max_shards=max_shards)
    assert [s.rows for s in plan] == sizes
    assert [s.index for s in plan] == list(range(len(plan)))
    seen = [item for shard in plan for item in lines_of(storage, str(source), shard)]
    assert [n for n, _ in seen] == list(range(1, rows + 1))  # global line numbers, each once, in order
    assert seen == list(read_jsonl(storage.iter_lines(str(source))))


def test_the_plan_reads_s3_ranges_pinned_to_the_version_split(s3, bucket: str) -> None:
    body = "".join(json.dumps({"id": i}) + "\n" for i in range(7)).encode()
    s3.put_object(Bucket=bucket, Key="in.jsonl", Body=body)
    storage = Storage()
    uri = f"s3://{bucket}/in.jsonl"
    plan = plan_shards(storage, uri, rows_per_shard=3)
    assert [[row["id"] for _, row in lines_of(storage, uri, s)] for s in plan] == [[0, 1, 2], [3, 4, 5], [6]]
    s3.put_object(Bucket=bucket, Key="in.jsonl", Body=body + b'{"id": 7}\n')  # replaced after the split
    with pytest.raises(InputError, match="changed after it was split"):
        lines_of(storage, uri, plan[1])


def test_a_local_input_changed_after_the_split_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1}\n{"id": 2}\n')
    plan = plan_shards(Storage(), str(source), rows_per_shard=1)
    source.write_text('{"id": 1}\n{"id": 2}\n{"id": 3}\n')
    with pytest.raises(InputError, match="changed after it was split"):
        lines_of(Storage(), str(source), plan[0])


def test_bad_plan_settings_and_missing_input_are_clear(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="rows_per_shard must be"):
        plan_shards(Storage(), str(tmp_path), rows_per_shard=0)
    with pytest.raises(InputError, match="max_shards 1..256"):
        plan_shards(Storage(), str(tmp_path), rows_per_shard=1, max_shards=MAX_SHARDS_LIMIT + 1)
    with pytest.raises(InputError, match="does not exist"):
        plan_shards(Storage(), str(tmp_path / "nope.jsonl"), rows_per_shard=1)


def test_shards_run_and_merge_to_the_unsharded_result(vlm_server, tmp_path: Path) -> None:
    source = write_image_rows(tmp_path, 11)
    with source.open("a") as handle:  # two bad lines land in errors, in whichever shard holds them
        handle.write("not json\n" + json.dumps({"id": 99}) + "\n")
    whole = run_job(job_options(vlm_server, tmp_path, source, output=str(tmp_path / "whole" / "rows.jsonl")))
    plan = plan_shards(Storage(), str(source), rows_per_shard=4)
    assert len(plan) == 4
    manifests = [
        run_job(
            job_options(
                vlm_server,
                tmp_path,
                source,
                output=str(tmp_path / "run" / "generate" / f"shard-{s.index:05d}.jsonl"),
                shard=s,
                task_key=f"d/generate/r/{s.index}",
            )
        )
        for s in reversed(plan)  # finishing order does not matter
    ]
    assert sorted(m.shard for m in manifests) == [0, 1, 2, 3] and [m.rows_in for m in manifests] == [1, 4, 4, 4]
    merged = merge_run(
        Storage(), {"generate": manifests}, output=str(tmp_path / "run" / "generate.jsonl"), plan=[s.model_dump() for s in plan]
    )

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "vqa_provenance"} for r in rows]

    assert strip(read_rows(tmp_path / "run" / "generate.jsonl")) == strip(read_rows(tmp_path / "whole" / "rows.jsonl"))
    assert read_rows(tmp_path / "run" / "generate.errors.jsonl") == read_rows(tmp_path / "whole" / "rows.errors.jsonl")
    assert (merged.rows_in, merged.rows_out, merged.rows_failed, merged.shards) == (13, 11, 2, 4)
    assert merged.failures_by_reason == whole.failures_by_reason == {"malformed_json": 1, "missing_field": 1}
    assert merged.generator == "image_qa" and merged.errors == {"generate": str(tmp_path / "run" / "generate.errors.jsonl")}
    # the manifest is written last, once the preview it names is there
    assert not (tmp_path / "run" / "generate.manifest.json").exists()
    final = finalize_run(Storage(), merged, title="t", media_root=str(tmp_path), allowed_roots=[str(tmp_path)])
    assert (tmp_path / "run" / "generate.preview.html").exists()
    assert json.loads((tmp_path / "run" / "generate.manifest.json").read_text()) == final.dump() == merged.dump()


def test_the_merge_refuses_a_shard_that_lost_rows(vlm_server, tmp_path: Path) -> None:
    source = write_image_rows(tmp_path, 4)
    plan = plan_shards(Storage(), str(source), rows_per_shard=2)
    manifests = [
        run_job(
            job_options(
                vlm_server,
                tmp_path,
                source,
                output=str(tmp_path / "g" / f"shard-{s.index}.jsonl"),
                shard=s,
                task_key=str(s.index),
            )
        )
        for s in plan
    ]
    shard_out = tmp_path / "g" / "shard-1.jsonl"
    shard_out.write_text(shard_out.read_text().splitlines()[0] + "\n")
    with pytest.raises(InputError, match="holds 1 rows but its task reported 2"):
        merge_run(
            Storage(), {"generate": manifests}, output=str(tmp_path / "generate.jsonl"), plan=[s.model_dump() for s in plan]
        )
    assert not (tmp_path / "generate.jsonl").exists() and not (tmp_path / "generate.errors.jsonl").exists()
    with pytest.raises(InputError, match="1 shard results for 2 shards"):
        merge_run(
            Storage(), {"generate": manifests[:1]}, output=str(tmp_path / "generate.jsonl"), plan=[s.model_dump() for s in plan]
        )
    more = [{**s.model_dump(), "rows": s.rows + 1} for s in plan]  # a plan the shards' reports do not add up to
    with pytest.raises(InputError, match="6 input rows but the shards report 4 in the output, 0 in errors files and 0 rejected"):
        merge_run(Storage(), {"generate": manifests}, output=str(tmp_path / "generate.jsonl"), plan=more)
    assert not list(tmp_path.glob("generate*"))  # nothing written by any refused merge


def test_a_runs_shards_split_the_servers_budget_unless_each_serves_its_own(tmp_path: Path) -> None:
    from vqa_operators.worker import JobOptions

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(64)))
    shards = plan_shards(Storage(), str(source), rows_per_shard=4, max_shards=16)
    assert len(shards) == 16 and {s.shards for s in shards} == {16}

    def effective_concurrency(**extra: object) -> int:
        return JobOptions(
            **{
                "generator": "image_qa",
                "output": str(tmp_path / "o.jsonl"),
                "max_num_seqs": 256,
                "concurrency": None,
                "shard": shards[3],
                **extra,
            }
        ).effective_concurrency

    assert effective_concurrency() == 20  # 1.25 x 256 = 320, split 16 ways
    assert effective_concurrency(serve_vllm=True) == 320  # a pod with its own vLLM keeps the whole budget
    assert effective_concurrency(concurrency=7) == 7  # a given concurrency is the task's own
    assert (
        JobOptions(
            generator="image_qa", input=str(source), output=str(tmp_path / "o.jsonl"), max_num_seqs=256, concurrency=None
        ).effective_concurrency
        == 320
    )
    # three shards of a 10-slot server: ceil(12 / 3)
    three = plan_shards(Storage(), str(source), rows_per_shard=22)
    assert [s.shards for s in three] == [3, 3, 3]
    assert (
        JobOptions(
            generator="image_qa", output="o.jsonl", max_num_seqs=10, concurrency=None, shard=three[0]
        ).effective_concurrency
        == 4
    )
