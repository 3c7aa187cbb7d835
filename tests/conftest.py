"""Shared fixtures: the OpenAI-compatible test double, a real S3-protocol server (moto), sample images."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.doubles.openai_server import OpenAITestServer

if TYPE_CHECKING:
    from PIL import Image
from vqa_operators.worker import JobOptions

MODEL = "test-vlm"


@pytest.fixture(scope="session")
def _vlm_server() -> Iterator[OpenAITestServer]:
    server = OpenAITestServer(MODEL).start()
    yield server
    server.stop()


@pytest.fixture
def vlm_server(_vlm_server: OpenAITestServer) -> Iterator[OpenAITestServer]:
    """The test double, with a clean script and request log for each test."""
    _vlm_server.reset()
    yield _vlm_server
    _vlm_server.reset()


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Idefics3 folder, built offline (scripts/tiny_vlm.py): what real vLLM serves in the tests."""
    from scripts.tiny_vlm import build_tiny_idefics3

    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny-idefics3"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server over real HTTP on localhost."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 at the moto server through the standard AWS environment variables."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


@pytest.fixture
def s3(s3_env: str):
    """A boto3 client for the moto server."""
    import boto3

    return boto3.client("s3")


@pytest.fixture
def bucket(s3) -> str:
    """A fresh bucket for one test."""
    name = f"vqa-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def make_jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30), exif_orientation: int | None = None) -> bytes:
    """A small JPEG, optionally with an EXIF orientation tag."""
    from PIL import Image

    img = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    if exif_orientation is None:
        img.save(buffer, format="JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields (random) crossed by sharp-edged squares."""
    from PIL import Image, ImageDraw

    w, h = size
    blobs = (max(1, w // 40), max(1, h // 40))
    img = Image.merge("RGB", [Image.effect_noise(blobs, 50 + 10 * ((i + seed) % 5)).resize(size, Image.Resampling.BICUBIC) for i in range(3)])
    draw = ImageDraw.Draw(img)
    step = max(2, w // 170)
    for x in range(0, w, 2 * step):
        for y in range(0, h, 2 * step):
            draw.rectangle((x, y, x + step - 1, y + step - 1), fill=(20, 20, 20))
    return img


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Three JPEGs of different sizes on disk."""
    paths = []
    for i, size in enumerate([(64, 48), (80, 80), (40, 100)]):
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(make_jpeg(size))
        paths.append(path)
    return paths


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the client's backoff shape but scale it down, so fault tests take seconds."""
    from vqa_operators.serving import openai_api

    monkeypatch.setattr(openai_api, "RETRY_BASE_DELAY_S", 0.01)


def write_image_rows(folder: Path, n: int) -> Path:
    """``folder/in.jsonl``: ``n`` image_qa rows (ids 0..n-1) over two small images in ``folder/media``."""
    media = folder / "media"
    media.mkdir(exist_ok=True)
    (media / "a.jpg").write_bytes(make_jpeg((64, 48)))
    (media / "b.jpg").write_bytes(make_jpeg((48, 64), color=(20, 120, 200)))
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "image": "a.jpg" if i % 2 else ["a.jpg", "b.jpg"]}) + "\n" for i in range(n)))
    return source


def job_options(server: OpenAITestServer, folder: Path, source: Path, **extra: object) -> JobOptions:
    """A worker run of image_qa over ``source`` into ``folder/out/rows.jsonl``; ``extra`` overrides any option."""
    settings: dict[str, object] = {
        "generator": "image_qa", "input": str(source), "output": str(folder / "out" / "rows.jsonl"), "base_url": server.base_url,
        "model": MODEL, "media_root": str(folder / "media"), "concurrency": 8, "seed": 3, "params": {"pairs_per_row": 2},
        "max_retries": 6, "request_timeout": 1.0, **extra,
    }
    return JobOptions(**settings)  # type: ignore[arg-type]


def read_rows(path: Path) -> list[dict]:
    """The rows of a local JSONL file (which must exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def checkpointed_rows(folder: Path) -> int:
    """Rows saved in every checkpoint part under ``folder``."""
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.checkpoint/**/part-*.jsonl"))
