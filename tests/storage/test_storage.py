"""Storage: streaming JSONL, atomic writes (local and S3), the AWS environment selecting the endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from vqa_operators.exceptions import InputError
from vqa_operators.storage import BadLine, JsonlWriter, Storage, errors_uri_for, join_uri, read_jsonl


def test_read_jsonl_reports_every_bad_line() -> None:
    lines = [b'{"a": 1}', b"", b"{broken", b"[1, 2]", b"\xff\xfe", '{"b": "caf\u00e9"}'.encode()]
    out = list(read_jsonl(lines))
    assert [n for n, _ in out] == [1, 2, 3, 4, 5, 6]
    assert out[0][1] == {"a": 1} and out[5][1] == {"b": "caf\u00e9"}
    reasons = [item.reason for _, item in out if isinstance(item, BadLine)]
    assert reasons == ["blank_line", "malformed_json", "not_an_object", "not_utf8"]


def test_local_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "rows.jsonl"
    storage = Storage()
    with pytest.raises(RuntimeError), storage.open_atomic(str(target)) as handle:
        handle.write(b"partial\n")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_local_atomic_write_replaces(tmp_path: Path) -> None:
    target = tmp_path / "rows.jsonl"
    target.write_text("old\n")
    storage = Storage()
    with storage.open_atomic(str(target)) as handle:
        JsonlWriter(handle).write({"x": 1})
        assert target.read_text() == "old\n"  # not visible before the block ends
    assert target.read_text() == '{"x": 1}\n'


def test_missing_local_input_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        list(Storage().iter_lines(str(tmp_path / "nope.jsonl")))


def test_s3_roundtrip_streams_lines(s3, bucket: str) -> None:
    storage = Storage()  # endpoint from AWS_ENDPOINT_URL_S3
    uri = f"s3://{bucket}/dir/rows.jsonl"
    with storage.open_atomic(uri) as handle:
        writer = JsonlWriter(handle)
        for i in range(3000):
            writer.write({"i": i, "text": "x" * 50})
    rows = [row for _, row in read_jsonl(storage.iter_lines(uri))]
    assert [r["i"] for r in rows] == list(range(3000))
    assert storage.exists(uri) and not storage.exists(f"s3://{bucket}/dir/other.jsonl")


def test_s3_failed_write_creates_no_object(s3, bucket: str) -> None:
    storage = Storage()
    with pytest.raises(RuntimeError), storage.open_atomic(f"s3://{bucket}/out.jsonl") as handle:
        handle.write(b'{"partial": true}\n')
        raise RuntimeError("killed mid-write")
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_missing_s3_object_is_an_input_error(s3, bucket: str) -> None:
    with pytest.raises(InputError, match="NoSuchKey"):
        list(Storage().iter_lines(f"s3://{bucket}/missing.jsonl"))


def test_uri_helpers() -> None:
    assert errors_uri_for("s3://b/k/out.jsonl") == "s3://b/k/out.errors.jsonl"
    assert join_uri("s3://b/media/", "./a.jpg") == "s3://b/media/a.jpg"
    assert join_uri("/data", "imgs/a.jpg") == "/data/imgs/a.jpg"
    assert join_uri("/data", "s3://x/y.jpg") == "s3://x/y.jpg"


def test_s3_write_to_a_missing_bucket_is_a_storage_error(s3) -> None:
    from vqa_operators.exceptions import StorageError

    with pytest.raises(StorageError, match="cannot write s3://no-such-bucket-x/out.jsonl: NoSuchBucket"):
        with Storage().open_atomic("s3://no-such-bucket-x/out.jsonl") as handle:
            handle.write(b"{}\n")


def count_puts(client) -> list[str]:
    """Record every PutObject / CompleteMultipartUpload the client sends."""
    calls: list[str] = []
    for op in ("PutObject", "CompleteMultipartUpload"):
        client.meta.events.register(f"before-call.s3.{op}", lambda model, **_: calls.append(model.name))
    return calls


def test_s3_identical_rewrite_is_skipped(s3, bucket: str) -> None:
    storage = Storage()
    puts = count_puts(storage.s3)
    uri = f"s3://{bucket}/o.jsonl"
    for _ in range(2):
        with storage.open_atomic(uri) as handle:
            handle.write(b'{"a": 1}\n')
    assert puts == ["PutObject"]
    with storage.open_atomic(uri) as handle:
        handle.write(b'{"a": 2}\n')
    assert puts == ["PutObject", "PutObject"] and storage.read_bytes(uri) == b'{"a": 2}\n'


@pytest.mark.parametrize("existed", [False, True], ids=["new-object", "existing-object"])
def test_s3_write_fails_if_another_writer_changed_the_object(s3, bucket: str, existed: bool) -> None:
    from vqa_operators.exceptions import StorageError

    uri = f"s3://{bucket}/o.jsonl"
    if existed:
        s3.put_object(Bucket=bucket, Key="o.jsonl", Body=b"first try\n")
    with pytest.raises(StorageError, match="another writer changed it .*PreconditionFailed"):
        with Storage().open_atomic(uri) as handle:
            handle.write(b"second try\n")
            s3.put_object(Bucket=bucket, Key="o.jsonl", Body=b"an overlapping try finished first\n")
    assert s3.get_object(Bucket=bucket, Key="o.jsonl")["Body"].read() == b"an overlapping try finished first\n"


def test_exclusive_write_never_replaces(s3, bucket: str, tmp_path: Path) -> None:
    from vqa_operators.exceptions import StorageError

    for uri in (f"s3://{bucket}/part-1.jsonl", str(tmp_path / "part-1.jsonl")):
        with Storage().open_atomic(uri, exclusive=True) as handle:
            handle.write(b"mine\n")
        with pytest.raises(StorageError, match="already exists"), Storage().open_atomic(uri, exclusive=True) as handle:
            handle.write(b"theirs\n")
        assert Storage().read_bytes(uri) == b"mine\n"


def test_large_s3_objects_go_up_in_parts_with_the_same_condition(s3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.storage import uris

    monkeypatch.setattr(uris, "S3_PUT_LIMIT", 1024)
    monkeypatch.setattr(uris, "S3_PART_SIZE", 5 * 1024 * 1024)
    storage = Storage()
    conditions: list[dict] = []
    storage.s3.meta.events.register(
        "before-parameter-build.s3.CompleteMultipartUpload",
        lambda params, **_: conditions.append({k: v for k, v in params.items() if k.startswith("If")}),
    )
    uri = f"s3://{bucket}/big.jsonl"
    body = b"x" * (6 * 1024 * 1024)
    with storage.open_atomic(uri) as handle:
        handle.write(body)
    assert storage.read_bytes(uri) == body
    etag = s3.head_object(Bucket=bucket, Key="big.jsonl")["ETag"]
    with storage.open_atomic(uri) as handle:
        handle.write(body + b"y")
    # S3 enforces these on CompleteMultipartUpload; moto 5.2.5 accepts them without enforcing,
    # so this checks that the condition is sent, not that a race is refused (see the PutObject tests)
    assert conditions == [{"IfNoneMatch": "*"}, {"IfMatch": etag}]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_local_identical_rewrite_is_skipped_and_a_race_is_refused(tmp_path: Path) -> None:
    from vqa_operators.exceptions import StorageError

    target = tmp_path / "o.jsonl"
    storage = Storage()
    with storage.open_atomic(str(target)) as handle:
        handle.write(b"a\n")
    before = target.stat()
    with storage.open_atomic(str(target)) as handle:
        handle.write(b"a\n")
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with pytest.raises(StorageError, match="another writer"), storage.open_atomic(str(target)) as handle:
        handle.write(b"b\n")
        target.write_text("raced\n")
    assert target.read_text() == "raced\n"
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]  # no temporary file left behind


def test_every_s3_client_takes_the_store_retry_policy(monkeypatch: pytest.MonkeyPatch, s3_env: str) -> None:
    import json

    from vqa_operators.hooks.storage import s3_storage

    monkeypatch.setenv("AIRFLOW_CONN_VQA_S3_TEST", json.dumps({"conn_type": "aws", "extra": {"endpoint_url": s3_env}}))
    monkeypatch.setenv("VQA_S3_MAX_ATTEMPTS", "7")
    for storage in (Storage(), s3_storage("vqa_s3_test")):
        assert storage.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert Storage().attempts == 7


@pytest.mark.parametrize(
    ("status", "code", "definite"),
    [
        (404, "NoSuchKey", True),
        (403, "AccessDenied", True),
        (412, "PreconditionFailed", True),
        (416, "InvalidRange", True),
        (503, "SlowDown", False),
        (500, "InternalError", False),
        (400, "RequestTimeout", False),
        (429, "TooManyRequests", False),
        (503, "503", False),
        (408, "RequestTimeout", False),
    ],
)
def test_only_a_definite_answer_about_the_object_is_final(status: int, code: str, definite: bool) -> None:
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

    from vqa_operators.storage.uris import definite as is_definite

    assert (
        is_definite(ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))
        is definite
    )
    assert not is_definite(ConnectionClosedError(endpoint_url="http://s3")) and not is_definite(
        ReadTimeoutError(endpoint_url="http://s3")
    )
