"""What every container of ours carries, the worker's pod and the run's model server alike: volumes, Secrets by reference, a locked-down context.

Kubernetes models only; ``pod`` and ``model_server`` both build on it, and it imports neither.

**The process receives the text that was typed.** The kubelet expands ``$(NAME)`` in a container's
``command``, ``args`` and ``env`` values from the container's own environment before the process
starts, and that environment holds the Secrets' values (the API key, the S3 keys). A param holding
``$(VQA_API_KEY)`` would reach the worker as the key itself. So every command word, argument and
env value we write is escaped for the kubelet (``$`` → ``$$``, which it turns back into ``$``), in
one place: ``process``. The one exception is the env that DAG authors and deployment admins write
in code (``PodSettings.env``, ``VQA_POD_ENV``): trusted, passed as written, so it may use
``$(VAR)`` on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from airflow.providers.cncf.kubernetes.secret import Secret
from kubernetes.client import models as k8s

from vqa_operators import settings
from vqa_operators.operators.placement import PodSettings


def volumes(placement: PodSettings, tmp_size: str) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """``/tmp`` (sized), a memory-backed ``/dev/shm`` and the model cache at ``/models`` (a PVC, or an emptyDir)."""
    cache = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=placement.model_cache_claim) if placement.model_cache_claim else None
    found = [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=placement.shm_size)),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=tmp_size)),
        k8s.V1Volume(name="model-cache", persistent_volume_claim=cache, empty_dir=None if cache else k8s.V1EmptyDirVolumeSource()),
    ]
    mounts = [
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        k8s.V1VolumeMount(name="model-cache", mount_path="/models"),
    ]
    return found, mounts


def secrets(placement: PodSettings) -> list[Secret]:
    """The Secrets the pod reads by reference: the API key, the S3 credentials (envFrom) and any ``secret_env``."""
    found = []
    if placement.api_key_secret:
        found.append(Secret("env", settings.API_KEY_ENV, placement.api_key_secret, placement.api_key_secret_key))
    if placement.s3_secret:
        found.append(Secret("env", None, placement.s3_secret))  # envFrom: the AWS_* keys of the Secret
    found += [Secret("env", name, ref.secret, ref.key) for name, ref in sorted(placement.secret_env.items())]
    return found


def locked_down() -> k8s.V1SecurityContext:
    """A container that cannot gain privileges, holds no capabilities and cannot write its image's files."""
    return k8s.V1SecurityContext(allow_privilege_escalation=False, read_only_root_filesystem=True, capabilities=k8s.V1Capabilities(drop=["ALL"]))


def kubelet_literal(text: str) -> str:
    """``text`` as the kubelet must leave it: each ``$`` doubled, so that ``$(VAR)`` expansion gives back exactly ``text``."""
    return text.replace("$", "$$")


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
