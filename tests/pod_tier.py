"""The container tier, shared by the slow tests that run DAGs in kubernetes mode: a namespace whose pods podman runs.

``airflow dags test`` runs with ``VQA_EXECUTION=kubernetes``; each pod the operator builds is created
in the namespace (``testkit.cluster``) and runs as a container from the images built from our
Dockerfiles (``scripts/images.py``), with its own network, the namespace's Secrets and nothing of
the caller's environment. Its servers (S3, the model double) listen on every address of this
machine, and the pods reach them at this machine's address, as a cluster's pods reach a Service.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.images import PODMAN_ENV
from testkit.cluster import Claim, Config, Namespace, Node, Service, host_address

# what the namespace's Secrets hold: the model server's key (vqa-vlm) and the S3 credentials (vqa-s3)
API_KEY = "sk-pods-4d8e1a-never-in-a-spec"
AWS_KEY_ID, AWS_SECRET = "pods-key-id", "pods-aws-secret-7b2c9f-never-in-a-spec"
SECRETS = {"vqa-vlm": {"api-key": API_KEY}, "vqa-s3": {"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}}
# the images as a deployment names them (VQA_WORKER_IMAGE, VQA_VLLM_IMAGE); the namespace tags ours with these names
WORKER_IMAGE = "registry.example/vqa-worker:test"
VLLM_IMAGE = "registry.example/vqa-worker-vllm:test"
NAMESPACE = "vqa"
MODEL_CACHE = "vqa-model-cache"


@dataclass
class PodTier:
    """The namespace, and where its pods reach this machine's servers."""

    namespace: Namespace
    address: str

    @classmethod
    def create(cls, workdir: Path, tags: Mapping[str, str]) -> PodTier:
        """A namespace with the Secrets and the model cache claim, our images under their deployment names, and two nodes.

        A CPU node, and a GPU node as a managed node pool makes one (GKE, AKS, EKS without NVIDIA's
        GPU operator): the smallest one-GPU shape (8 vCPU, 32 GiB: g5.2xlarge, g2-standard-8, less
        what the node keeps for itself), tainted ``nvidia.com/gpu``, advertising ``nvidia.com/gpu``,
        and with no GPU Feature Discovery label. The scheduler places a GPU pod there, where vLLM's
        CPU build runs (no device is given).
        """
        nodes = [
            Node(
                name="cpu-1",
                labels={"kubernetes.io/hostname": "cpu-1"},
                allocatable={"cpu": "7910m", "memory": "29Gi", "ephemeral-storage": "180Gi", "pods": "58"},
            ),
            Node(
                name="gpu-1",
                labels={"kubernetes.io/hostname": "gpu-1"},
                taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
                allocatable={"cpu": "7910m", "memory": "29Gi", "ephemeral-storage": "180Gi", "nvidia.com/gpu": "1", "pods": "58"},
            ),
        ]
        config = Config(
            name=NAMESPACE,
            workdir=str(workdir),
            podman_env=PODMAN_ENV,
            secrets=SECRETS,
            nodes=nodes,
            # block storage: the kubelet gives the pod's fsGroup the volume
            claims={MODEL_CACHE: Claim(path=str(workdir / "claims" / MODEL_CACHE))},
            # a model service named as vLLM's Kubernetes guide warns against: with service links on, every later pod of the
            # namespace gets VLLM_PORT=tcp://..., and vLLM refuses to start (the in-pod vLLM test would fail)
            services={"vllm": Service(host="10.96.12.7", ports={"http": 8000})},
        )
        # nothing else: the XCom sidecar runs from the pod's own image (the pod operator's default, alpine from Docker Hub,
        # would be ErrImagePull here, as on an air-gapped cluster)
        images = {WORKER_IMAGE: tags["vqa-worker"], VLLM_IMAGE: tags["vqa-worker-vllm-cpu"]}
        return cls(Namespace.create(config, images=images), host_address())

    @property
    def workdir(self) -> Path:
        return Path(self.namespace.config.workdir)

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` of an ``airflow dags test`` in kubernetes mode whose pods this namespace runs."""
        return {**self.namespace.env(env), "VQA_WORKER_IMAGE": WORKER_IMAGE, "VQA_VLLM_IMAGE": VLLM_IMAGE}

    def pods(self) -> list[dict[str, Any]]:
        """Every pod made so far: task id, map index, exit code, manifest and log."""
        return self.namespace.pods()

    def s3_url(self, port: int) -> str:
        return f"http://{self.address}:{port}"

    @contextlib.contextmanager
    def without_secret(self, name: str) -> Iterator[None]:
        """The namespace without the Secret ``name`` for the block (as if nobody had created it)."""
        data = self.namespace.delete_secret(name)
        try:
            yield
        finally:
            self.namespace.put_secret(name, data)

    @contextlib.contextmanager
    def forbidding(self, resource: str) -> Iterator[None]:
        """Airflow's account may not touch ``resource`` for the block (a Role that does not grant it): each call is 403."""
        self.namespace.config.forbidden.append(resource)
        self.namespace.save()
        try:
            yield
        finally:
            self.namespace.config.forbidden.remove(resource)
            self.namespace.save()

    @contextlib.contextmanager
    def with_claim(self, name: str, claim: Claim) -> Iterator[None]:
        """The claim ``name`` bound to ``claim``'s volume for the block."""
        old = self.namespace.put_claim(name, claim)
        try:
            yield
        finally:
            if old is not None:
                self.namespace.put_claim(name, old)
