"""The pod tier, shared by the slow tests that run DAGs in kubernetes mode: where their pods run, with which Secrets.

``airflow dags test`` runs with ``VQA_EXECUTION=kubernetes``; each worker pod the operator builds is
handed to the kubelet stand-in (``testkit.kubelet``, loaded through ``tests/kubelet_site``) and run
as its spec stands, with the namespace's Secrets below and nothing of the caller's environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.airflow_env import ROOT

# what the namespace's Secrets hold: the model server's key (vqa-vlm) and the S3 credentials (vqa-s3)
API_KEY = "sk-pods-4d8e1a-never-in-a-spec"
AWS_KEY_ID, AWS_SECRET = "pods-key-id", "pods-aws-secret-7b2c9f-never-in-a-spec"
SECRETS = {"vqa-vlm": {"api-key": API_KEY}, "vqa-s3": {"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}}
IMAGE = "registry.example/vqa-worker:test"


def install_worker_image(dist: Path) -> Path:
    """Where the pods' ``python3`` comes from: vLLM's environment with this package's wheel installed, as the worker image has them."""
    python = ROOT / ".venv-vllm" / "bin" / "python"
    assert python.exists(), "the pod tier needs .venv-vllm (make vllm-venv)"
    uv = str(Path(sys.executable).with_name("uv"))
    subprocess.run([uv, "build", "--quiet", "--wheel", "-o", str(dist), str(ROOT)], check=True, capture_output=True)
    wheel = next(dist.glob("vqa_airflow-*.whl"))
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), "--no-deps", "--reinstall", str(wheel)], check=True, capture_output=True)
    return python.parent


@dataclass(frozen=True)
class PodTier:
    """One kubelet stand-in: its work folder, its config (image, Secrets) and the record of every pod it ran."""

    workdir: Path

    @classmethod
    def create(cls, workdir: Path, image_bin: Path) -> PodTier:
        config = {
            "image_bin": str(image_bin),
            "dockerfile": str(ROOT / "docker" / "worker.Dockerfile"),
            "secrets": SECRETS,
            "workdir": str(workdir),
            "record": str(workdir / "pods.jsonl"),
        }
        (workdir / "config.json").write_text(json.dumps(config))
        return cls(workdir)

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` of an ``airflow dags test`` in kubernetes mode whose pods this tier runs."""
        return {
            **env,
            "VQA_EXECUTION": "kubernetes",
            "VQA_WORKER_IMAGE": IMAGE,
            "VQA_TEST_KUBELET": str(self.workdir / "config.json"),
            "PYTHONPATH": f"{ROOT / 'tests' / 'kubelet_site'}:{ROOT / 'plugins'}:{ROOT}",
        }

    def pods(self) -> list[dict[str, Any]]:
        """Every pod run so far: task id, map index, exit code, manifest and logs."""
        record = self.workdir / "pods.jsonl"
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
