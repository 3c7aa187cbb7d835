"""Both images' Dockerfiles are clean under hadolint (they cannot be built here: no Docker engine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/worker.Dockerfile"])
def test_hadolint_clean(dockerfile: str) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    proc = subprocess.run([str(hadolint), "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_worker_image_entrypoint_matches_the_pod_command() -> None:
    text = (ROOT / "docker/worker.Dockerfile").read_text()
    assert 'ENTRYPOINT ["python3", "-m", "vqa_operators"]' in text
    from vqa_operators.operators.pod import VQAWorkerPodOperator  # noqa: F401 - the pod uses the same argv
