"""Every Dockerfile is clean under hadolint; the worker images are built and run by the container tier (tests/deploy/test_images.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "dockerfile", ["Dockerfile", "docker/worker.Dockerfile", "docker/worker-vllm.Dockerfile", "docker/worker-vllm-cpu.Dockerfile"]
)
def test_hadolint_clean(dockerfile: str) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    proc = subprocess.run([str(hadolint), "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_worker_image_entrypoint_matches_the_pod_command(tmp_path, monkeypatch) -> None:
    """The pod overrides the image's command; both must be the worker CLI."""
    import json
    import re

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    from vqa_operators.operators.pod import VQAWorkerPodOperator
    from vqa_operators.operators.spec import WorkerSpec

    entrypoint = re.search(r"^ENTRYPOINT (.+)$", (ROOT / "docker/worker.Dockerfile").read_text(), re.MULTILINE)
    assert entrypoint is not None
    pod = VQAWorkerPodOperator(task_id="t", spec=WorkerSpec(generator="image_qa", input="s3://b/in.jsonl"))
    assert pod.cmds == json.loads(entrypoint.group(1)) == ["python3", "-m", "vqa_operators"]
