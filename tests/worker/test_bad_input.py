"""The bad-input corpus: every bad line gets a reason in the errors file while the rest is processed."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from testkit.data import MODEL, make_jpeg, read_rows
from testkit.openai_server import OpenAITestServer
from vqa_operators.exceptions import ConfigError, InputError
from vqa_operators.storage import Storage
from vqa_operators.worker import JobOptions, run_job
from vqa_operators.worker.cli import main


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels in a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def job(
    tmp_path: Path, server: OpenAITestServer, lines: list[bytes], generator: str = "image_qa", **extra
) -> tuple[dict, list[dict], list[dict]]:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out" / "rows.jsonl"
    opts = JobOptions(
        generator=generator,
        input=str(source),
        output=str(out),
        base_url=server.base_url,
        model=MODEL,
        media_root=str(tmp_path / "media"),
        concurrency=4,
        max_retries=0,
        **extra,
    )
    manifest = run_job(opts)
    return manifest, read_rows(out), read_rows(tmp_path / "out" / "rows.errors.jsonl")


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    (root / "good.jpg").write_bytes(make_jpeg((96, 64)))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG body")
    (root / "truncated.jpg").write_bytes(make_jpeg((256, 256))[:300])
    (root / "empty.jpg").write_bytes(b"")
    (root / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (root / "bomb.png").write_bytes(png_header(40_000, 40_000))
    (tmp_path / "outside.jpg").write_bytes(make_jpeg((32, 32)))  # exists, but outside the media root
    (root / "link.jpg").symlink_to(tmp_path / "outside.jpg")  # inside by name, outside by target
    return root


def test_image_corpus_every_line_has_an_outcome(vlm_server: OpenAITestServer, tmp_path: Path, media: Path) -> None:
    elsewhere = tmp_path / "outside.jpg"
    corpus: list[tuple[bytes, str | None]] = [
        (json.dumps({"id": "ok-1", "image": "good.jpg"}).encode(), None),
        (b'{"id": "x", "image": ', "malformed_json"),
        (b"[1, 2, 3]", "not_an_object"),
        (b'"just a string"', "not_an_object"),
        (b"", "blank_line"),
        (b"   ", "blank_line"),
        (json.dumps({"id": "no-image"}).encode(), "missing_field"),
        (json.dumps({"id": "null", "image": None}).encode(), "missing_field"),
        (json.dumps({"id": "int", "image": 5}).encode(), "bad_field"),
        (json.dumps({"id": "list-of-int", "image": [1]}).encode(), "bad_field"),
        (json.dumps({"id": "missing", "image": "nope.jpg"}).encode(), "image_not_found"),
        (json.dumps({"id": "corrupt", "image": "corrupt.jpg"}).encode(), "bad_image"),
        (json.dumps({"id": "truncated", "image": "truncated.jpg"}).encode(), "bad_image"),
        (json.dumps({"id": "zero", "image": "empty.jpg"}).encode(), "bad_image"),
        (json.dumps({"id": "svg", "image": "drawing.svg"}).encode(), "bad_image"),
        (json.dumps({"id": "bomb", "image": "bomb.png"}).encode(), "bad_image"),
        (json.dumps({"id": "traversal", "image": "../outside.jpg"}).encode(), "path_not_allowed"),
        (json.dumps({"id": "absolute", "image": str(elsewhere)}).encode(), "path_not_allowed"),
        (json.dumps({"id": "etc", "image": "/etc/passwd"}).encode(), "path_not_allowed"),
        (json.dumps({"id": "symlink", "image": "link.jpg"}).encode(), "path_not_allowed"),
        (b'{"id": "latin1", "image": "caf\xe9.jpg"}', "not_utf8"),
        (json.dumps({"id": "ok-2", "image": ["good.jpg", str(media / "good.jpg")]}).encode(), None),
    ]
    manifest, out, errors = job(tmp_path, vlm_server, [line for line, _ in corpus])

    assert [r["id"] for r in out] == ["ok-1", "ok-2"]
    assert [e["line"] for e in errors] == [n for n, (_, reason) in enumerate(corpus, start=1) if reason]
    assert [e["reason"] for e in errors] == [reason for _, reason in corpus if reason]
    assert all(e["detail"] for e in errors)
    assert manifest.rows_in == len(corpus) and manifest.rows_out + manifest.rows_failed == len(corpus)
    by_line = {e["line"]: e for e in errors}
    assert "too large" in by_line[16]["detail"]
    assert by_line[21]["raw_line"].startswith('{"id": "latin1"')  # the bad bytes are kept, replaced, not lost
    # nothing outside the media root was sent to the model: only the two good rows made requests
    assert len(vlm_server.requests) == 2


def test_s3_media_missing_and_denied(vlm_server: OpenAITestServer, tmp_path: Path, s3, bucket: str) -> None:
    from botocore.exceptions import ClientError

    s3.put_object(Bucket=bucket, Key="media/good.jpg", Body=make_jpeg((64, 64)))
    s3.put_object(Bucket=bucket, Key="private/secret.jpg", Body=make_jpeg((64, 64)))

    def deny_private(params: dict, **_: object) -> None:
        # moto does not enforce IAM here: this botocore hook answers as S3 does for a denied key
        if params.get("Key", "").startswith("private/"):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")

    client = Storage().s3
    client.meta.events.register("before-parameter-build.s3.GetObject", deny_private)
    lines = [
        json.dumps({"id": "ok", "image": "media/good.jpg"}),
        json.dumps({"id": "missing", "image": "media/nope.jpg"}),
        json.dumps({"id": "denied", "image": "private/secret.jpg"}),
        json.dumps({"id": "other-bucket", "image": "s3://some-other-bucket/x.jpg"}),
        json.dumps({"id": "dotdot", "image": "media/../private/secret.jpg"}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rows.jsonl"
    opts = JobOptions(
        generator="image_qa",
        input=str(source),
        output=str(out),
        base_url=vlm_server.base_url,
        model=MODEL,
        media_root=f"s3://{bucket}/",
        max_retries=0,
    )
    manifest = run_job(opts, storage=Storage(s3_client=client))
    errors = read_rows(tmp_path / "rows.errors.jsonl")
    assert [r["id"] for r in read_rows(out)] == ["ok"]
    assert [(e["row"]["id"], e["reason"]) for e in errors] == [
        ("missing", "image_not_found"),
        ("denied", "image_unreadable"),
        ("other-bucket", "path_not_allowed"),
        ("dotdot", "path_not_allowed"),
    ]
    assert "AccessDenied" in errors[1]["detail"]
    assert manifest.rows_failed == 4


def test_allowed_roots_are_configurable(
    vlm_server: OpenAITestServer, tmp_path: Path, media: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a.jpg").write_bytes(make_jpeg((40, 40)))
    lines = [json.dumps({"image": str(shared / "a.jpg")}).encode(), json.dumps({"image": "good.jpg"}).encode()]
    monkeypatch.setenv("VQA_ALLOWED_MEDIA_ROOTS", f"{media},{shared}")
    manifest, out, errors = job(tmp_path, vlm_server, lines)
    assert (manifest.rows_out, errors) == (2, [])

    monkeypatch.setenv("VQA_ALLOWED_MEDIA_ROOTS", f"{shared}")  # the media root itself is not allowed
    with pytest.raises(ConfigError, match="outside the allowed media roots"):
        job(tmp_path, vlm_server, lines)


def test_video_corpus(vlm_server: OpenAITestServer, tmp_path: Path, media: Path) -> None:
    frames = ["good.jpg", "good.jpg"]
    good = {"id": "v-ok", "Meta": "an ad", "Clips": [{"Description": "a shoe", "Audio_Text": "buy", "Frames_Images": frames}]}
    corpus = [
        (good, None),
        ({"id": "v-empty", "Meta": "x", "Clips": []}, "bad_field"),
        ({"id": "v-noframes", "Meta": "x", "Clips": [{"Description": "a shoe", "Audio_Text": ""}]}, "bad_field"),
        ({"id": "v-nullmeta", "Meta": None, "Clips": good["Clips"]}, "missing_field"),
        ({"id": "v-clips-type", "Meta": "x", "Clips": {"Description": "x"}}, "bad_field"),
        ({"id": "v-long", "Meta": "word " * 20_000, "Clips": good["Clips"]}, "prompt_too_long"),
        (
            {"id": "v-traversal", "Meta": "x", "Clips": [{"Description": "d", "Frames_Images": ["../outside.jpg"]}]},
            "path_not_allowed",
        ),
    ]
    manifest, out, errors = job(tmp_path, vlm_server, [json.dumps(r).encode() for r, _ in corpus], generator="video_qa_initial")
    assert [r["id"] for r in out] == ["v-ok"]
    assert [(e["row"]["id"], e["reason"]) for e in errors] == [(r["id"], reason) for r, reason in corpus if reason]
    assert "budget is 60000" in errors[-2]["detail"]
    assert len(vlm_server.requests) == 1  # the too-long prompt was never sent


@pytest.mark.parametrize("case", ["missing", "directory", "not-readable"])
def test_unreadable_input_is_a_one_line_job_error(
    vlm_server: OpenAITestServer, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    if case == "directory":
        source.mkdir()
    elif case == "not-readable":
        source.write_text("{}\n")
        source.chmod(0)
        if os.access(source, os.R_OK):
            source.chmod(0o644)
            source = tmp_path / "in-dir"
            source.mkdir()  # as root every file is readable; a directory is not a file either
    code = main(
        [
            "run",
            "image_qa",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--base-url",
            vlm_server.base_url,
            "--model",
            MODEL,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == InputError.exit_code
    assert err[-1].startswith("vqa_operators: InputError: cannot read ") and len(err[-1]) < 300
    assert not (tmp_path / "o.jsonl").exists()
