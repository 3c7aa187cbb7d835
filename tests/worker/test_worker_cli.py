"""The worker CLI end to end: S3 in, S3 out, every row accounted for, manifest last, exit codes."""

from __future__ import annotations

import json

import pytest

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer, Reply
from tests.helpers import run_worker


@pytest.fixture
def s3_input(s3, bucket: str) -> str:
    s3.put_object(Bucket=bucket, Key="media/a.jpg", Body=make_jpeg((320, 200)))
    s3.put_object(Bucket=bucket, Key="media/b.jpg", Body=make_jpeg((90, 90)))
    s3.put_object(Bucket=bucket, Key="media/corrupt.jpg", Body=b"\xff\xd8\xff garbage")
    lines = [
        json.dumps({"id": 1, "image": [f"s3://{bucket}/media/a.jpg", f"s3://{bucket}/media/b.jpg"]}),
        json.dumps({"id": 2, "image": "media/b.jpg"}),  # relative to --media-root
        "{not json",
        json.dumps({"id": 3, "image": "media/corrupt.jpg"}),
        json.dumps({"id": 4, "image": "media/nope.jpg"}),
        json.dumps({"id": 5, "caption": "no image key"}),
        json.dumps({"id": 6, "image": ["media/a.jpg"]}),
    ]
    s3.put_object(Bucket=bucket, Key="in/rows.jsonl", Body=("\n".join(lines) + "\n").encode())
    return f"s3://{bucket}/in/rows.jsonl"


def read_jsonl(s3, uri: str) -> list[dict]:
    bucket, key = uri[5:].split("/", 1)
    return [json.loads(line) for line in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]


def test_end_to_end_on_s3(vlm_server: OpenAITestServer, s3, bucket: str, s3_input: str) -> None:
    def row1_never_parses(body: dict) -> Reply | None:  # row 1 is the only one with two images
        parts = [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url"]
        return Reply(content="still not JSON") if len(parts) == 2 else None

    vlm_server.responder = row1_never_parses
    output = f"s3://{bucket}/out/image_qa.jsonl"
    proc = run_worker(
        "image_qa",
        "--input",
        s3_input,
        "--output",
        output,
        "--media-root",
        f"s3://{bucket}/",
        "--concurrency",
        "1",
        "--seed",
        "42",
        "--param",
        "pairs_per_row=2",
        env={"VQA_BASE_URL": vlm_server.base_url, "VQA_MODEL": MODEL, "VQA_API_KEY": "sk-test-secret-123"},
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert manifest["rows_in"] == 7 and manifest["rows_out"] == 2 and manifest["rows_failed"] == 5
    assert manifest["failures_by_reason"] == {
        "bad_image": 1,
        "image_not_found": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "invalid_json": 1,
    }
    assert manifest["errors"] == f"s3://{bucket}/out/image_qa.errors.jsonl"
    out = read_jsonl(s3, output)
    errors = read_jsonl(s3, manifest["errors"])
    assert sorted(r["id"] for r in out) == [2, 6]
    assert sorted(e["line"] for e in errors) == [1, 3, 4, 5, 6]
    for row in out:
        assert len(row["qa_pairs"]) == 2
        prov = row["vqa_provenance"]["image_qa"]
        assert prov["model"] == MODEL and prov["seed"] == 42 and len(prov["prompt_sha256"]) == 64
        assert prov["prompt_sha256"] == manifest["prompt_sha256"]
    first = next(e for e in errors if e["line"] == 1)
    assert first["row"]["id"] == 1 and first["raw_output"] == "still not JSON"
    assert next(e for e in errors if e["line"] == 3)["raw_line"] == "{not json"
    assert set(vlm_server.authorizations) == {"Bearer sk-test-secret-123"}  # VQA_API_KEY is sent, as a bearer token
    # no secret reaches the output, errors, manifest or logs
    for text in (proc.stdout, proc.stderr, json.dumps(out), json.dumps(errors)):
        assert "sk-test-secret-123" not in text and "testing-secret-value" not in text
    # per-row seeds derive from --seed: same row, same seed on a rerun
    seeds = [r["seed"] for r in vlm_server.requests]
    assert len(set(seeds)) == len(seeds) - 1  # two requests (the repair) share row 1's seed


def test_rerun_is_idempotent(vlm_server: OpenAITestServer, s3, bucket: str, s3_input: str) -> None:
    output = f"s3://{bucket}/out/again.jsonl"
    args = ("image_qa", "--input", s3_input, "--output", output, "--media-root", f"s3://{bucket}/", "--seed", "1")
    env = {"VQA_BASE_URL": vlm_server.base_url, "VQA_MODEL": MODEL}
    first = run_worker(*args, env=env)
    body1 = s3.get_object(Bucket=bucket, Key="out/again.jsonl")["Body"].read()
    second = run_worker(*args, env=env)
    body2 = s3.get_object(Bucket=bucket, Key="out/again.jsonl")["Body"].read()
    assert first.returncode == second.returncode == 0
    assert body1 == body2


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--input", "s3://{bucket}/missing.jsonl"], 3, "InputError: cannot read s3://{bucket}/missing.jsonl: NoSuchKey"),
        (["--concurrency", "0"], 2, "ConfigError: bad options: concurrency"),
        (["--base-url", "http://127.0.0.1:9/v1"], 4, "ServerUnavailableError"),
        (["--model", "not-served"], 2, "ConfigError: model 'not-served' is not served"),
    ],
    ids=["missing-input", "bad-config", "server-down", "unknown-model"],
)
def test_job_level_failures_exit_non_zero_with_one_line(
    vlm_server: OpenAITestServer, s3, bucket: str, s3_input: str, args, code, message
) -> None:
    base = {"--input": s3_input, "--output": f"s3://{bucket}/out/x.jsonl", "--base-url": vlm_server.base_url, "--model": MODEL}
    extra = [a.format(bucket=bucket) for a in args]
    for flag in extra[::2]:
        base.pop(flag, None)
    argv = [x for kv in base.items() for x in kv] + extra
    proc = run_worker("image_qa", *argv, "--max-retries", "1")
    assert proc.returncode == code
    last = proc.stderr.strip().splitlines()[-1]
    assert message.format(bucket=bucket) in last
    assert proc.stdout == ""  # no manifest for a failed job
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="out/")  # nothing partial written


def test_video_qa_stages_chain_through_s3(vlm_server: OpenAITestServer, s3, bucket: str) -> None:
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"video/f{i}.jpg", Body=make_jpeg((320, 180)))
    clip = {"Audio_Text": "hello", "Description": "a runner", "Frames_Images": ["video/f0.jpg", "video/f1.jpg", "video/f2.jpg"]}
    lines = [
        json.dumps(
            {
                "id": "a",
                "Meta": "ad one",
                "Clips": [clip, {**clip, "Frames_Images": ["video/f3.jpg", "video/f4.jpg", "video/f5.jpg"]}],
            }
        ),
        json.dumps({"id": "b", "Meta": "ad two", "Clips": [clip]}),
        json.dumps({"id": "c", "Meta": "no clips"}),
        "[1, 2]",
    ]
    s3.put_object(Bucket=bucket, Key="in/videos.jsonl", Body=("\n".join(lines) + "\n").encode())
    env = {"VQA_BASE_URL": vlm_server.base_url, "VQA_MODEL": MODEL}
    common = ("--media-root", f"s3://{bucket}/", "--seed", "3", "--max-tokens", "4096")
    stages = [
        ("video_qa_initial", f"s3://{bucket}/in/videos.jsonl", ["--param", "max_frames=4"]),
        ("video_qa_multiagent", f"s3://{bucket}/run/initial.jsonl", ["--param", "max_iterations=2"]),
        ("video_qa_final", f"s3://{bucket}/run/multiagent.jsonl", ["--param", "final_pairs=5"]),
    ]
    manifests = []
    for generator, source, extra in stages:
        target = f"s3://{bucket}/run/{generator.removeprefix('video_qa_')}.jsonl"
        proc = run_worker(generator, "--input", source, "--output", target, *common, *extra, env=env)
        assert proc.returncode == 0, proc.stderr
        manifests.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [(m["rows_in"], m["rows_out"], m["rows_failed"]) for m in manifests] == [(4, 2, 2), (2, 2, 0), (2, 2, 0)]
    assert manifests[0]["failures_by_reason"] == {"missing_field": 1, "not_an_object": 1}
    middle = read_jsonl(s3, manifests[1]["output"])
    assert all(r["video_qa_state"]["iterations"] == 2 and len(r["video_qa_state"]["experts"]) == 2 for r in middle)
    final = read_jsonl(s3, manifests[2]["output"])
    assert [r["id"] for r in final] == ["a", "b"]
    for row in final:
        assert set(row) == {"id", "Meta", "Clips", "QA", "vqa_provenance"}
        assert len(row["QA"]) == 5 and all(
            set(p) == {"Label", "Question", "Answer", "Clips"} and all(0 <= c < len(row["Clips"]) for c in p["Clips"])
            for p in row["QA"]
        )
        # each stage's provenance is kept; the final one holds the experts the state carried
        prov = row["vqa_provenance"]
        assert set(prov) == {"video_qa_initial", "video_qa_multiagent", "video_qa_final"}
        assert len(prov["video_qa_initial"]["frames_sent"]) == (4 if row["id"] == "a" else 3)  # the budget, or every frame
        assert [e["iteration"] for e in prov["video_qa_final"]["state"]["experts"]] == [1, 2]
    # 2 videos: initial 2 + multiagent 2 x 2 x 3 + final 2
    assert len(vlm_server.requests) == 16


def test_pers_qa_command(vlm_server: OpenAITestServer, s3, bucket: str, s3_input: str) -> None:
    output = f"s3://{bucket}/out/pers.jsonl"
    proc = run_worker(
        "pers_qa",
        "--input",
        s3_input,
        "--output",
        output,
        "--media-root",
        f"s3://{bucket}/",
        "--param",
        "tag=<hero>",
        env={"VQA_BASE_URL": vlm_server.base_url, "VQA_MODEL": MODEL},
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert manifest["rows_in"] == 7 and manifest["rows_out"] + manifest["rows_failed"] == 7 and manifest["rows_out"] == 3
    for row in read_jsonl(s3, output):
        question, answer = row["pers_qa"].removeprefix("Question: ").split(" Answer: ")
        assert "<hero>" in question and answer.startswith("<hero> ")
        assert row["vqa_provenance"]["pers_qa"]["question_category"]
