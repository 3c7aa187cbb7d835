"""Where worker pods run and what they carry (kubernetes mode): ``PodSettings``, per DAG and per task (``Placement``).

Plain pydantic, no Kubernetes import, so DAG files may declare their placement at parse time. A
pod holds a GPU only where the model runs: a worker that calls a model service (the ``vqa_vlm``
connection's host, or the run's own model server) is a CPU pod, sized for its task's work; a
worker that starts vLLM itself (no service configured) is a GPU pod on a GPU node. Fields left as
None take those defaults (``size``, ``gpus``); fields given win in both topologies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vqa_operators import settings


@dataclass(frozen=True)
class Size:
    """A pod's CPU and memory (requests and limits alike), and the size of its ``/tmp``."""

    cpu: str
    memory: str
    tmp: str


# CPU pods, by the work their task does: the ingest decodes video and copies each S3 video to /tmp whole
CPU_SIZES: dict[str, Size] = {"video_ingest": Size(cpu="4", memory="8Gi", tmp="64Gi")}
CPU_SIZE = Size(cpu="2", memory="4Gi", tmp="16Gi")
# GPU pods hold vLLM too: its engine's host memory and CPU threads beside the worker's
GPU_SIZE = Size(cpu="8", memory="48Gi", tmp="16Gi")
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
# every container's home and caches on its writable volumes (the root file system is read-only): /tmp, and the model cache
CONTAINER_ENV = {"HOME": "/tmp", "HF_HOME": "/models", "XDG_CACHE_HOME": "/tmp/.cache"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


class SecretKey(BaseModel):
    """One key of a Kubernetes Secret, to put in a pod's environment by reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str = Field(min_length=1)
    key: str = Field(min_length=1)


class PodSettings(BaseModel):
    """How a worker pod is placed, sized and what it carries; the defaults suit the deployment kit (``deploy/``)."""

    model_config = ConfigDict(extra="forbid")

    # pods that call a model service run the worker image; pods that run vLLM (and the run's server) the vLLM image
    image: str = Field(default_factory=lambda: settings.environment().worker_image)
    vllm_image: str = Field(default_factory=lambda: settings.environment().vllm_image)
    namespace: str | None = Field(default_factory=lambda: settings.environment().namespace)
    service_account_name: str | None = None
    # None: by topology and task (CPU_SIZES, CPU_SIZE, GPU_SIZE)
    cpu: str | None = None
    memory: str | None = None
    tmp_size: str | None = None
    # None: 1 where vLLM runs in the pod, else 0
    gpus: int | None = Field(None, ge=0, le=16)
    gpu_resource: str = "nvidia.com/gpu"
    # what every pod gets, and what a GPU pod gets besides
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: dict(GPU_NODE_SELECTOR))
    gpu_tolerations: list[dict[str, str]] = Field(default_factory=lambda: [dict(t) for t in GPU_TOLERATIONS])
    shm_size: str = "16Gi"
    model_cache_claim: str | None = "vqa-model-cache"
    # Secrets by reference: the model server's API key, the S3 credentials (envFrom; None for IRSA / workload identity)
    api_key_secret: str | None = "vqa-vlm"
    api_key_secret_key: str = "api-key"
    s3_secret: str | None = "vqa-s3"
    # more environment: literal values, and keys of Secrets (e.g. {"HF_TOKEN": {"secret": "hf-token", "key": "token"}}).
    # ``env`` is written in code by DAG authors (or VQA_POD_ENV by admins), so it is trusted and passed to the kubelet as
    # written: it may use $(VAR) on purpose (e.g. {"NO_PROXY": "$(MY_HOSTS),.svc"}). Everything else a pod carries,
    # params above all, is escaped so that the process receives it as typed (containers.Process).
    env: dict[str, str] = Field(default_factory=lambda: dict(settings.environment().pod_env))
    secret_env: dict[str, SecretKey] = Field(default_factory=dict)
    image_pull_secrets: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    priority_class_name: str | None = None
    # the images' own user (docker/worker.Dockerfile, docker/worker-vllm.Dockerfile)
    run_as_user: int = Field(2000, ge=1)
    startup_timeout_seconds: int = 1800
    # what the worker may take to stop after SIGTERM (it checkpoints its finished rows within seconds, then stops vLLM)
    termination_grace_period: int = Field(settings.POD_GRACE_PERIOD_S, ge=5, le=3600)
    # wait for the pod in the triggerer instead of a worker slot: for pods that run for hours (needs a running triggerer);
    # None: Airflow's [operators] default_deferrable (False unless the deployment says otherwise)
    deferrable: bool | None = None
    # how often the triggerer checks a deferred pod, in seconds
    poll_interval: float = Field(30.0, gt=0)

    def size(self, generator: str, *, gpu: bool) -> Size:
        """CPU, memory and /tmp for a pod running ``generator``: what was given, else the topology's default for that work."""
        default = Size(GPU_SIZE.cpu, GPU_SIZE.memory, CPU_SIZES.get(generator, GPU_SIZE).tmp) if gpu else CPU_SIZES.get(generator, CPU_SIZE)
        return Size(cpu=self.cpu or default.cpu, memory=self.memory or default.memory, tmp=self.tmp_size or default.tmp)

    def gpu_count(self, *, serves_model: bool) -> int:
        """GPUs the pod requests: what was given, else one where vLLM runs in the pod and none elsewhere."""
        return self.gpus if self.gpus is not None else int(serves_model)


class Placement(BaseModel):
    """A DAG's pod settings (``default``) and, per task id, the fields a task changes (``tasks``)."""

    model_config = ConfigDict(extra="forbid")

    default: PodSettings = Field(default_factory=PodSettings)
    tasks: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def for_task(self, task_id: str) -> PodSettings:
        """The settings of ``task_id``'s pods: the DAG's, with the task's own changes (checked as PodSettings)."""
        changes = self.tasks.get(task_id)
        return self.default if not changes else PodSettings.model_validate({**self.default.model_dump(), **changes})
