"""Shared fixtures: the OpenAI-compatible test double, a real S3-protocol server (moto), sample images."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer


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
def pod_tier(tmp_path_factory: pytest.TempPathFactory):
    """The kubelet stand-in that runs a kubernetes-mode run's pods, with this package installed where its image stands."""
    from tests.pod_tier import PodTier, install_worker_image

    image_bin = install_worker_image(tmp_path_factory.mktemp("dist"))
    return PodTier.create(tmp_path_factory.mktemp("kubelet"), image_bin)


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


