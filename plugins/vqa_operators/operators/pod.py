"""``VQAWorkerPodOperator``: the same worker command in a pod on a GPU node (``VQA_EXECUTION=kubernetes``).

The model server is either an existing vLLM service (the ``vqa_vlm`` connection's host, passed as
``VQA_BASE_URL``) or, when no URL is configured, vLLM's server started inside the pod by the
worker (``--serve-vllm``), health-checked before the first row. Secrets come from Kubernetes
Secrets by reference; no secret value is ever written into the pod spec.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from kubernetes.client import models as k8s
from pydantic import BaseModel, ConfigDict, Field

from vqa_operators import settings
from vqa_operators.exceptions import FAIL_WITHOUT_RETRY
from vqa_operators.operators.spec import WorkerSpec

XCOM_FILE = "/airflow/xcom/return.json"


class PodSettings(BaseModel):
    """How worker pods are placed and what they mount; override per DAG or with ``VQA_WORKER_IMAGE``."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(default_factory=lambda: settings.environment().worker_image)
    namespace: str | None = Field(default_factory=lambda: settings.environment().namespace)
    gpus: int = Field(1, ge=0, le=16)
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str = "32Gi"
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    shm_size: str = "16Gi"
    model_cache_claim: str | None = "vqa-model-cache"
    api_key_secret: str | None = "vqa-vlm"
    api_key_secret_key: str = "api-key"
    s3_secret: str | None = "vqa-s3"
    service_account_name: str | None = None
    run_as_user: int = 1000
    # the only places rows may read media from (the worker's --allowed-media-root); default: the media root
    allowed_media_roots: list[str] = Field(default_factory=lambda: settings.environment().allowed_media_roots)
    startup_timeout_seconds: int = 1800
    # what the worker may take to stop after SIGTERM (it checkpoints its finished rows within seconds, then stops vLLM)
    termination_grace_period: int = Field(settings.POD_GRACE_PERIOD_S, ge=5, le=3600)
    # wait for the pod in the triggerer instead of a worker slot: for pods that run for hours (needs a running triggerer);
    # None: Airflow's [operators] default_deferrable (False unless the deployment says otherwise)
    deferrable: bool | None = None
    # how often the triggerer checks a deferred pod, in seconds
    poll_interval: float = Field(30.0, gt=0)


def _volumes(placement: PodSettings) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    cache = (
        k8s.V1PersistentVolumeClaimVolumeSource(claim_name=placement.model_cache_claim)
        if placement.model_cache_claim
        else None
    )
    volumes = [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=placement.shm_size)),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
        k8s.V1Volume(name="model-cache", persistent_volume_claim=cache, empty_dir=None if cache else k8s.V1EmptyDirVolumeSource()),
    ]
    mounts = [
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        k8s.V1VolumeMount(name="model-cache", mount_path="/models"),
    ]
    return volumes, mounts


class VQAWorkerPodOperator(KubernetesPodOperator):
    """Run ``python -m vqa_operators run ...`` in a GPU pod; the manifest comes back through XCom."""

    def __init__(
        self, *, spec: WorkerSpec, shard: dict[str, Any] | None = None, pod: PodSettings | None = None, vlm_conn_id: str = "vqa_vlm", **kwargs: Any
    ) -> None:
        placement = pod or PodSettings()
        volumes, mounts = _volumes(placement)
        limits = {"cpu": placement.cpu, "memory": placement.memory}
        if placement.gpus:
            limits[placement.gpu_resource] = str(placement.gpus)
        secrets = []
        if placement.api_key_secret:
            secrets.append(Secret("env", "VQA_API_KEY", placement.api_key_secret, placement.api_key_secret_key))
        if placement.s3_secret:
            secrets.append(Secret("env", None, placement.s3_secret))  # envFrom: AWS_* keys of the Secret
        kwargs.setdefault("name", f"vqa-{spec.generator.replace('_', '-')}")
        if placement.deferrable is not None:  # else the pod operator's default: the deployment's default_deferrable
            kwargs["deferrable"] = placement.deferrable
        super().__init__(
            image=placement.image,
            namespace=placement.namespace,
            cmds=["python3", "-m", "vqa_operators"],
            arguments=[*spec.argv(), *(["--shard", json.dumps(shard, sort_keys=True)] if shard else []), "--xcom-file", XCOM_FILE],
            env_vars=[
                k8s.V1EnvVar(name="HOME", value="/tmp"),
                k8s.V1EnvVar(name="HF_HOME", value="/models"),
                k8s.V1EnvVar(name="XDG_CACHE_HOME", value="/tmp/.cache"),
                *([k8s.V1EnvVar(name=settings.PREFIX + "ALLOWED_MEDIA_ROOTS", value=",".join(placement.allowed_media_roots))] if placement.allowed_media_roots else []),
            ],
            secrets=secrets,
            container_resources=k8s.V1ResourceRequirements(limits=limits, requests={"cpu": placement.cpu, "memory": placement.memory}),
            node_selector=placement.node_selector,
            tolerations=[k8s.V1Toleration(**t) for t in placement.tolerations],
            volumes=volumes,
            volume_mounts=mounts,
            service_account_name=placement.service_account_name,
            security_context=k8s.V1PodSecurityContext(
                run_as_non_root=True,
                run_as_user=placement.run_as_user,
                run_as_group=placement.run_as_user,
                fs_group=placement.run_as_user,
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
            container_security_context=k8s.V1SecurityContext(
                allow_privilege_escalation=False,
                read_only_root_filesystem=True,
                capabilities=k8s.V1Capabilities(drop=["ALL"]),
            ),
            startup_timeout_seconds=placement.startup_timeout_seconds,
            termination_grace_period=placement.termination_grace_period,
            poll_interval=placement.poll_interval,
            do_xcom_push=True,
            get_logs=True,
            on_finish_action="delete_succeeded_pod",
            **kwargs,
        )
        # Airflow renders template fields in place, and mapped instances share partial()'s spec
        self.spec = copy.deepcopy(spec)
        self.shard = shard
        self.vlm_conn_id = vlm_conn_id

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """The KubernetesPodOperator's pod, plus the model endpoint: a service URL, or vLLM in the pod."""
        from vqa_operators.hooks.vlm import VLMHook

        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        endpoint = VLMHook(self.vlm_conn_id).get_endpoint()
        container = pod.spec.containers[0]
        env = list(container.env or [])
        if endpoint.base_url:
            env.append(k8s.V1EnvVar(name="VQA_BASE_URL", value=endpoint.base_url))
        else:
            container.args = [*container.args, "--serve-vllm"]
        if endpoint.model:  # the default; a --model rendered from the run's params wins
            env.append(k8s.V1EnvVar(name="VQA_MODEL", value=endpoint.model))
        container.env = env
        # the worker's last log lines (its one-line reason) become the pod's termination message
        container.termination_message_policy = "FallbackToLogsOnError"
        return pod

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, xcom_result: dict | None = None, context: Any = None) -> None:
        """The pod operator's verdict, except that a worker exit code no retry can fix fails the task at once.

        Both execution modes end here (the deferrable one through ``trigger_reentry``), so the same
        exit codes fail without retries as in local mode: configuration (2) and unreadable input (3).
        """
        from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

        try:
            super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except AirflowSkipException:
            raise
        except AirflowException as err:
            code = worker_exit_code(remote_pod, self.base_container_name)
            final = next((cls for cls in FAIL_WITHOUT_RETRY if cls.exit_code == code), None)
            if final is not None:
                raise AirflowFailException(f"the worker exited with code {code} ({final.__name__}): another try would fail the same way\n{err}") from err
            raise


def worker_exit_code(remote_pod: k8s.V1Pod | None, container: str) -> int | None:
    """The exit code of the pod's worker container, if it has terminated."""
    from airflow.providers.cncf.kubernetes.utils.container import get_container_status

    status = get_container_status(remote_pod, container) if remote_pod is not None else None
    terminated = status.state.terminated if status is not None and status.state else None
    return terminated.exit_code if terminated is not None else None
