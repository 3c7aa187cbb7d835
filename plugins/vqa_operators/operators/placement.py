"""Where worker pods run and what they carry (kubernetes mode): ``PodSettings``, per DAG and per task (``Placement``).

Plain pydantic, no Kubernetes import, so DAG files may declare their placement at parse time. A
pod holds a GPU only where the model runs: a worker that calls a model service (the ``vqa_vlm``
connection's host, or the run's own model server) is a CPU pod, sized for its task's work; a
worker that starts vLLM itself (no service configured) is a GPU pod on a GPU node. Fields left as
None take those defaults (``size``, ``gpus``); fields given win in both topologies.

Three layers, each over the one before: these defaults; the deployment's (``VQA_POD_DEFAULTS``, a
JSON object of these fields, set once for every DAG, e.g. ``{"s3_secret": null,
"service_account_name": "vqa-worker"}`` for IRSA); a DAG file's ``PodSettings(...)`` and its
``Placement(tasks=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vqa_operators import settings


@dataclass(frozen=True)
class Size:
    """A pod's CPU and memory requests, their limits (None: the request), and the size of its ``/tmp``."""

    cpu: str
    memory: str
    tmp: str
    cpu_limit: str | None = None
    memory_limit: str | None = None

    @property
    def requests(self) -> dict[str, str]:
        # the scheduler places the pod where its /tmp fits; the emptyDir's sizeLimit bounds it
        return {"cpu": self.cpu, "memory": self.memory, "ephemeral-storage": self.tmp}

    @property
    def limits(self) -> dict[str, str]:
        return {"cpu": self.cpu_limit or self.cpu, "memory": self.memory_limit or self.memory}


# CPU pods, by the work their task does: the ingest decodes video and copies each S3 video to /tmp whole
CPU_SIZES: dict[str, Size] = {"video_ingest": Size(cpu="4", memory="8Gi", tmp="64Gi")}
CPU_SIZE = Size(cpu="2", memory="4Gi", tmp="16Gi")
# GPU pods hold vLLM too: its engine's host memory and CPU threads beside the worker's. Requests below limits, so that a
# one-GPU node of 8 vCPU and 32 GiB (g5.2xlarge, g2-standard-8, NC8as_T4_v3 has 56) takes the pod beside its daemons
GPU_SIZE = Size(cpu="4", memory="24Gi", tmp="16Gi", cpu_limit="8", memory_limit="28Gi")
# a GPU pod lands on a GPU node because it requests the GPU resource (the device plugin advertises it) and tolerates the
# GPU nodes' taint; no label is needed (GPU Feature Discovery's nvidia.com/gpu.present is absent on GKE, AKS and plain EKS)
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
# every container's home and caches on its writable volumes (the root file system is read-only): /tmp, and the model
# cache where one is mounted (MODEL_CACHE_ENV: pods that load a model)
CONTAINER_ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "HF_HOME": "/tmp/.cache/huggingface"}
MODEL_CACHE = "/models"
MODEL_CACHE_ENV = {**CONTAINER_ENV, "HF_HOME": MODEL_CACHE}
# the XCom sidecar waits for the worker's manifest: a shell loop, from the pod's own image unless one is named
XCOM_SIDECAR_RESOURCES = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}}
# PodSettings fields the deployment sets through their own variables, not VQA_POD_DEFAULTS
OWN_VARIABLES = {"image": "VQA_WORKER_IMAGE", "vllm_image": "VQA_VLLM_IMAGE", "namespace": "VQA_NAMESPACE"}


class SecretKey(BaseModel):
    """One key of a Kubernetes Secret, to put in a pod's environment by reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str = Field(min_length=1)
    key: str = Field(min_length=1)


class PodSettings(BaseModel):
    """How a worker pod is placed, sized and what it carries; the defaults suit the deployment kit (``deploy/``).

    A field not given takes the deployment's default (``VQA_POD_DEFAULTS``), else the one below.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _deployment_defaults(cls, data: Any) -> Any:
        """The deployment's defaults (``VQA_POD_DEFAULTS``) under the fields given."""
        if not isinstance(data, dict):
            return data
        defaults = settings.environment().pod_defaults
        for name in defaults:
            if name in OWN_VARIABLES:
                raise ValueError(f"VQA_POD_DEFAULTS sets {name!r}: set {OWN_VARIABLES[name]} instead")
            if name not in cls.model_fields:
                raise ValueError(
                    f"VQA_POD_DEFAULTS sets {name!r}, which is not a PodSettings field ({', '.join(sorted(cls.model_fields))})"
                )
        return {**defaults, **data}

    # pods that call a model service run the worker image; pods that run vLLM (and the run's server) the vLLM image
    image: str = Field(default_factory=lambda: settings.environment().worker_image)
    vllm_image: str = Field(default_factory=lambda: settings.environment().vllm_image)
    namespace: str | None = Field(default_factory=lambda: settings.environment().namespace)
    service_account_name: str | None = None
    # None: by topology and task (CPU_SIZES, CPU_SIZE, GPU_SIZE); cpu and memory are requests, their limits the *_limit
    # fields (None: the topology's limit where cpu/memory are not given either, else the request)
    cpu: str | None = None
    memory: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None
    tmp_size: str | None = None
    # None: 1 where vLLM runs in the pod, else 0
    gpus: int | None = Field(None, ge=0, le=16)
    gpu_resource: str = "nvidia.com/gpu"
    # what every pod gets, and what a GPU pod gets besides
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[dict[str, str]] = Field(default_factory=lambda: [dict(t) for t in GPU_TOLERATIONS])
    shm_size: str = "16Gi"
    # the model cache, mounted at /models only in pods that load a model (GPU pods, the run's server); None: an emptyDir
    model_cache_claim: str | None = "vqa-model-cache"
    # Secrets by reference: the model server's API key, the S3 credentials (envFrom; None for IRSA / workload identity)
    api_key_secret: str | None = "vqa-vlm"
    api_key_secret_key: str = "api-key"
    s3_secret: str | None = "vqa-s3"
    # more environment: literal values, and keys of Secrets (e.g. {"HF_TOKEN": {"secret": "hf-token", "key": "token"}}).
    # ``env`` is written in code by DAG authors (or VQA_POD_DEFAULTS' env by admins), so it is trusted and passed to the kubelet as
    # written: it may use $(VAR) on purpose (e.g. {"NO_PROXY": "$(MY_HOSTS),.svc"}). Everything else a pod carries,
    # params above all, is escaped so that the process receives it as typed (containers.Process).
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: dict[str, SecretKey] = Field(default_factory=dict)
    image_pull_secrets: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    priority_class_name: str | None = None
    # the images' own user (docker/worker.Dockerfile, docker/worker-vllm.Dockerfile)
    run_as_user: int = Field(2000, ge=1)
    # how long a pod may wait to be placed on a node, then to start (pull its image, mount its volumes): a CPU pod's, and
    # a GPU pod's (a GPU node pool may scale up from zero, and vLLM's image is several GB)
    schedule_timeout_seconds: int = Field(300, ge=10)
    startup_timeout_seconds: int = Field(300, ge=10)
    gpu_schedule_timeout_seconds: int = Field(900, ge=10)
    gpu_startup_timeout_seconds: int = Field(900, ge=10)
    # a failed pod is deleted once its log is in the task's log (Airflow's); True keeps it for kubectl describe
    keep_failed_pods: bool = False
    # the XCom sidecar: None runs it from the pod's own image (already on the node, in your registry: no Docker Hub pull)
    xcom_sidecar_image: str | None = None
    xcom_sidecar_resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in XCOM_SIDECAR_RESOURCES.items()}
    )
    # what the worker may take to stop after SIGTERM (it checkpoints its finished rows within seconds, then stops vLLM)
    termination_grace_period: int = Field(settings.POD_GRACE_PERIOD_S, ge=5, le=3600)
    # wait for the pod in the triggerer instead of a worker slot: for pods that run for hours (needs a running triggerer);
    # None: Airflow's [operators] default_deferrable (False unless the deployment says otherwise)
    deferrable: bool | None = None
    # how often the triggerer checks a deferred pod, in seconds
    poll_interval: float = Field(30.0, gt=0)

    def size(self, generator: str, *, gpu: bool) -> Size:
        """CPU, memory and /tmp for a pod running ``generator``: what was given, else the topology's default for that work."""
        default = GPU_SIZE if gpu else CPU_SIZES.get(generator, CPU_SIZE)
        tmp = CPU_SIZES.get(generator, default).tmp
        return Size(
            cpu=self.cpu or default.cpu,
            memory=self.memory or default.memory,
            tmp=self.tmp_size or tmp,
            cpu_limit=self.cpu_limit or (None if self.cpu else default.cpu_limit),
            memory_limit=self.memory_limit or (None if self.memory else default.memory_limit),
        )

    def timeouts(self, *, gpu: bool) -> tuple[int, int]:
        """How long the pod may wait to be scheduled, then to start: the GPU pods' own, or the CPU pods'."""
        if gpu:
            return self.gpu_schedule_timeout_seconds, self.gpu_startup_timeout_seconds
        return self.schedule_timeout_seconds, self.startup_timeout_seconds

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
