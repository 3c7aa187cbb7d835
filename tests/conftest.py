"""Shared fixtures: the OpenAI-compatible test double, a real S3-protocol server (moto), sample images."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer

if TYPE_CHECKING:
    from tests.pod_tier import PodTier


@pytest.fixture(scope="session")
def _vlm_server() -> Iterator[OpenAITestServer]:
    # on every address: the container tier's pods reach it at this machine's address (its own 127.0.0.1 is the pod)
    server = OpenAITestServer(MODEL, host="0.0.0.0").start()
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
def worker_images() -> dict[str, str]:
    """The worker images built here from our Dockerfiles (scripts/images.py; built once per digest of their sources): name -> tag."""
    from scripts.images import ensure

    return ensure()


@pytest.fixture(scope="session")
def pod_tier(tmp_path_factory: pytest.TempPathFactory, worker_images: dict[str, str]) -> Iterator[PodTier]:
    """The container tier's namespace: pods run by podman from the images built from our Dockerfiles."""
    from tests.pod_tier import PodTier

    tier = PodTier.create(tmp_path_factory.mktemp("cluster"), worker_images)
    yield tier
    tier.namespace.remove_pods()


@pytest.fixture(scope="session")
def cluster_airflow(
    tmp_path_factory: pytest.TempPathFactory, _vlm_server: OpenAITestServer, _moto: int, pod_tier: PodTier
) -> dict[str, Any]:
    """An Airflow home, migrated once, whose connections name the servers at this machine's address, where pods reach them too.

    ``{"home": its folder, "env": its environment, "pristine": a copy of its database before any run}``: the model's key is the one the namespace's
    ``vqa-vlm`` Secret holds, so local and kubernetes runs send the same.
    """
    from tests.airflow_env import airflow, airflow_env
    from tests.pod_tier import API_KEY

    home = tmp_path_factory.mktemp("cluster_home")
    env = airflow_env(
        home, s3_endpoint=pod_tier.s3_url(_moto), vlm_base_url=_vlm_server.url_at(pod_tier.address), model=MODEL, api_key=API_KEY
    )
    migrate = airflow("db", "migrate", env=env)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    pristine = tmp_path_factory.mktemp("cluster_db") / "airflow.db"
    shutil.copy(
        home / "airflow.db", pristine
    )  # the database as migrated, before any run: for tests that read back only their own
    return {"home": home, "env": env, "pristine": pristine}


@pytest.fixture(scope="session")
def _moto() -> Iterator[int]:
    """A moto S3 server over real HTTP, on every address of this machine (the container tier's pods reach it too): its port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="0.0.0.0", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()[1]
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(_moto: int) -> str:
    """The S3 server's URL on this machine."""
    return f"http://127.0.0.1:{_moto}"


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
