"""What every container of ours carries, the worker's pod and the run's model server alike: volumes, Secrets by reference, a locked-down context.

Kubernetes models only; ``pod`` and ``model_server`` both build on it (``Workload``: one container and what its pod
carries, made once from the pod settings), and it imports neither.

**The process receives the text that was typed.** The kubelet expands ``$(NAME)`` in a container's
``command``, ``args`` and ``env`` values from the container's own environment before the process
starts, and that environment holds the Secrets' values (the API key, the S3 keys). A param holding
``$(VQA_API_KEY)`` would reach the worker as the key itself. So every command word, argument and
env value we write is escaped for the kubelet (``$`` → ``$$``, which it turns back into ``$``), in
one place: ``process``. The one exception is the env that DAG authors and deployment admins write
in code (``PodSettings.env``, and ``env`` in ``VQA_POD_DEFAULTS``): trusted, passed as written, so it may use
``$(VAR)`` on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow.providers.cncf.kubernetes.secret import Secret
from kubernetes.client import models as k8s

from vqa_operators import settings
from vqa_operators.operators.placement import CONTAINER_ENV, MODEL_CACHE, MODEL_CACHE_ENV, PodSettings, Size


def volumes(placement: PodSettings, tmp_size: str, *, loads_model: bool) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """``/tmp`` (sized), a memory-backed ``/dev/shm`` and, where a model loads, the model cache at ``/models`` (a PVC, or an emptyDir).

    A pod that only calls a model service mounts no cache: its scheduling never waits on the claim.
    """
    found = [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=placement.shm_size)),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=tmp_size)),
    ]
    mounts = [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"), k8s.V1VolumeMount(name="tmp", mount_path="/tmp")]
    if loads_model:
        cache = (
            k8s.V1PersistentVolumeClaimVolumeSource(claim_name=placement.model_cache_claim)
            if placement.model_cache_claim
            else None
        )
        found.append(
            k8s.V1Volume(
                name="model-cache", persistent_volume_claim=cache, empty_dir=None if cache else k8s.V1EmptyDirVolumeSource()
            )
        )
        mounts.append(k8s.V1VolumeMount(name="model-cache", mount_path=MODEL_CACHE))
    return found, mounts


def home_env(*, loads_model: bool) -> dict[str, str]:
    """The home and caches of a container on a read-only root: /tmp, and the Hugging Face cache on the model cache where one is mounted."""
    return dict(MODEL_CACHE_ENV if loads_model else CONTAINER_ENV)


def pod_security(placement: PodSettings) -> k8s.V1PodSecurityContext:
    """The pod runs as the images' user; its volumes belong to that user's group, changed only where the root does not already
    (``OnRootMismatch``: a model cache of many files is not walked at every start)."""
    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=placement.run_as_user,
        run_as_group=placement.run_as_user,
        fs_group=placement.run_as_user,
        fs_group_change_policy="OnRootMismatch",
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def resources(placement: PodSettings, size: Size, gpus: int) -> k8s.V1ResourceRequirements:
    """Requests and limits of the pod's main container; a GPU is asked for in both (extended resources allow no overcommit)."""
    gpu = {placement.gpu_resource: str(gpus)} if gpus else {}
    return k8s.V1ResourceRequirements(limits={**size.limits, **gpu}, requests={**size.requests, **gpu})


def node_placement(placement: PodSettings, gpus: int) -> tuple[dict[str, str], list[k8s.V1Toleration]]:
    """Node selector and tolerations: the GPU nodes' own where the pod asks for a GPU, then what every pod gets."""
    selector = {**(placement.gpu_node_selector if gpus else {}), **placement.node_selector}
    tolerations = [k8s.V1Toleration(**t) for t in [*(placement.gpu_tolerations if gpus else []), *placement.tolerations]]
    return selector, tolerations


def secrets(placement: PodSettings) -> list[Secret]:
    """The Secrets the pod reads by reference: the API key, the S3 credentials (envFrom) and any ``secret_env``."""
    found = []
    if placement.api_key_secret:
        found.append(Secret("env", settings.API_KEY_ENV, placement.api_key_secret, placement.api_key_secret_key))
    if placement.s3_secret:
        found.append(Secret("env", None, placement.s3_secret))  # envFrom: the AWS_* keys of the Secret
    found += [Secret("env", name, ref.secret, ref.key) for name, ref in sorted(placement.secret_env.items())]
    return found


def missing_secrets(read_secret: Any, placements: Iterable[PodSettings]) -> list[str]:
    """What the pods of ``placements`` read that the namespace lacks: a Secret, or a key of one, each naming its setting.

    ``read_secret(name)`` returns the Secret's keys, or None if there is no such Secret.
    """
    wanted: dict[str, dict[str, str]] = {}  # Secret -> {key, or "" for envFrom: the setting that names it}
    for placement in placements:
        for secret in secrets(placement):
            if secret.secret == placement.s3_secret and secret.key is None:
                setting = "s3_secret"
            elif secret.deploy_target == settings.API_KEY_ENV:
                setting = "api_key_secret"
            else:
                setting = f"secret_env[{secret.deploy_target!r}]"
            wanted.setdefault(secret.secret, {})[secret.key or ""] = setting
    problems = []
    for name, keys in sorted(wanted.items()):
        found = read_secret(name)
        if found is None:
            problems.append(f"Secret {name!r} ({', '.join(sorted(set(keys.values())))}) does not exist")
            continue
        problems += [
            f"Secret {name!r} has no key {key!r} ({setting})" for key, setting in sorted(keys.items()) if key and key not in found
        ]
    return problems


# a container waiting for one of these will not start until someone changes the cluster or the spec (the kubelet retries for ever)
NEVER_STARTS = ("CreateContainerConfigError", "CreateContainerError", "InvalidImageName", "ErrImageNeverPull")
# ... and a server's container, which the kubelet restarts and pulls again, will not serve either
NEVER_SERVES = (*NEVER_STARTS, "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull")


def waiting_in(remote_pod: k8s.V1Pod | None, reasons: tuple[str, ...]) -> k8s.V1ContainerStatus | None:
    """The first of the pod's containers that waits for one of ``reasons``, if any."""
    statuses = (remote_pod.status.container_statuses if remote_pod is not None and remote_pod.status is not None else None) or []
    for status in statuses:
        waiting = status.state.waiting if status.state is not None else None
        if waiting is not None and waiting.reason in reasons:
            return status
    return None


def locked_down() -> k8s.V1SecurityContext:
    """A container that cannot gain privileges, holds no capabilities and cannot write its image's files."""
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False, read_only_root_filesystem=True, capabilities=k8s.V1Capabilities(drop=["ALL"])
    )


def kubelet_literal(text: str) -> str:
    """``text`` as the kubelet must leave it: each ``$`` doubled, so that ``$(VAR)`` expansion gives back exactly ``text``."""
    return text.replace("$", "$$")


@dataclass(frozen=True)
class Workload:
    """One container of ours and what its pod carries, from the pod settings: image, process, Secrets, size, volumes,
    placement and security. The worker's pod sets the pod operator's fields from it; the run's server builds its
    Deployment's pod from it (``container``, ``pod_spec``)."""

    image: str
    process: Process
    secrets: list[Secret]
    gpus: int
    resources: k8s.V1ResourceRequirements
    volumes: list[k8s.V1Volume]
    mounts: list[k8s.V1VolumeMount]
    node_selector: dict[str, str]
    tolerations: list[k8s.V1Toleration]
    pod_security: k8s.V1PodSecurityContext
    security: k8s.V1SecurityContext
    image_pull_secrets: list[k8s.V1LocalObjectReference]

    @classmethod
    def of(
        cls,
        placement: PodSettings,
        *,
        role: str,
        loads_model: bool,
        command: Iterable[str],
        args: Iterable[str],
        env: Mapping[str, str],
    ) -> Workload:
        """The container of ``role`` (a task id, or ``model_server``): vLLM's image, a GPU, GPU placement and the model cache where
        it ``loads_model``; the worker image on a CPU node otherwise."""
        size = placement.size(role, gpu=loads_model)
        gpus = placement.gpu_count(serves_model=loads_model)
        found_volumes, mounts = volumes(placement, size.tmp, loads_model=loads_model)
        selector, tolerations = node_placement(placement, gpus)
        return cls(
            image=placement.vllm_image if loads_model else placement.image,
            process=Process.of(command, args, {**home_env(loads_model=loads_model), **env}, placement.env),
            secrets=secrets(placement),
            gpus=gpus,
            resources=resources(placement, size, gpus),
            volumes=found_volumes,
            mounts=mounts,
            node_selector=selector,
            tolerations=tolerations,
            pod_security=pod_security(placement),
            security=locked_down(),
            image_pull_secrets=[k8s.V1LocalObjectReference(name=name) for name in placement.image_pull_secrets],
        )

    def container(self, name: str, *, env: list[k8s.V1EnvVar] | None = None, **more: Any) -> k8s.V1Container:
        """The container, with ``env`` after the process's own and ``more`` of ``V1Container``'s fields (ports, probes)."""
        return k8s.V1Container(
            name=name,
            image=self.image,
            command=self.process.command,
            args=self.process.args,
            env=[*self.process.env, *(env or [])],
            resources=self.resources,
            volume_mounts=self.mounts,
            security_context=self.security,
            **more,
        )

    def pod_spec(self, containers: list[k8s.V1Container], placement: PodSettings) -> k8s.V1PodSpec:
        """A pod of ``containers`` as ours run: placed, the images' user, no API token, no service links."""
        return k8s.V1PodSpec(
            containers=containers,
            volumes=self.volumes,
            node_selector=self.node_selector or None,
            tolerations=self.tolerations or None,
            service_account_name=placement.service_account_name,
            automount_service_account_token=False,
            # no service-link variables: a Service named vllm in the namespace would give vLLM VLLM_PORT=tcp://..., which it refuses
            enable_service_links=False,
            image_pull_secrets=self.image_pull_secrets or None,
            priority_class_name=placement.priority_class_name,
            termination_grace_period_seconds=placement.termination_grace_period,
            security_context=self.pod_security,
        )


@dataclass(frozen=True)
class Process:
    """What a container runs, escaped for the kubelet: command words, arguments and env values reach the process as written here.

    ``authored_env`` is the env of ``PodSettings.env``, written in code by DAG authors and admins: it
    is passed as written (it may use ``$(VAR)`` on purpose) and wins over ``env`` on a shared name.
    """

    command: list[str]
    args: list[str]
    env: list[k8s.V1EnvVar]

    @classmethod
    def of(cls, command: Iterable[str], args: Iterable[str], env: Mapping[str, str], authored_env: Mapping[str, str]) -> Process:
        """The container's command, args and env: every value escaped for the kubelet but ``authored_env``'s."""
        values = {name: kubelet_literal(value) for name, value in env.items() if name not in authored_env}
        values.update(authored_env)
        return cls(
            command=[kubelet_literal(word) for word in command],
            args=[kubelet_literal(arg) for arg in args],
            env=[k8s.V1EnvVar(name=name, value=value) for name, value in values.items()],
        )
