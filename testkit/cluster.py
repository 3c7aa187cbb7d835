"""A namespace of a Kubernetes cluster, played by podman: the pod API the KubernetesPodOperator calls, answered with real containers.

No Kubernetes control plane can run here, but podman can run a Pod manifest as it stands
(``podman kube play``): its containers from real images, its env and ``secretKeyRef``/``envFrom``
Secrets (podman secrets), its volumes, ``securityContext``, resource limits (cgroups) and a network
namespace of its own. ``CoreV1`` answers the calls the operator makes of the API server (create,
read, list, patch and delete a pod, its log, its events, an exec into its XCom sidecar) from what
podman reports, so the operator's own code runs around each pod: its start and completion waits,
its log following, the XCom read through the sidecar, its cleanup and exit-code mapping.

What the kubelet and the scheduler do that podman 4.3 does not, this module does as they would,
before the pod is played:

- the container's environment and ``$(VAR)`` expansion in ``command``, ``args`` and env values
  (``testkit.expansion``), with the service-link variables of the namespace's Services unless the
  pod sets ``enableServiceLinks: false``. A missing Secret or key is ``CreateContainerConfigError``
  with the kubelet's message and an event, and the pod stays Pending, as on a cluster;
- ``emptyDir`` volumes: a fresh folder per pod, mode 0777 and group-owned by the pod's ``fsGroup``
  (podman makes them root's, 0755); a ``medium: Memory`` one is a tmpfs of its ``sizeLimit``, capped
  at the pod's memory limit;
- ``persistentVolumeClaim`` volumes: the claim's folder (``Claim``), with the owner and mode its
  storage gives it; ``fsGroup`` is applied only where the claim's storage supports it (block
  storage does, NFS does not). A claim that does not exist leaves the pod unschedulable;
- scheduling onto the namespace's nodes (``Node``): their labels against ``nodeSelector``, their
  taints against ``tolerations``, their allocatable CPU, memory and extended resources (GPUs) against
  the pod's requests (one pod at a time: what runs already is not subtracted). A pod no node takes
  stays Pending, ``Unschedulable``, with the scheduler's message; no GPU is ever given to a container
  (a node's ``nvidia.com/gpu`` is a count, not a device);
- an image missing from local storage is ``ErrImagePull`` (nothing can be pulled here);
- ``OOMKilled``: read from the kernel's log, as the kubelet's OOM watcher does (podman 4.3 under
  cgroup v1 reports no OOM kill);
- a deletion stops the pod's containers with SIGTERM and kills them after the grace period.

The pytest process sets the namespace up (``Namespace.create``: podman secrets, image tags, claim
folders) and hands its config to an ``airflow dags test`` process through ``VQA_TEST_CLUSTER``,
where ``install`` makes every ``KubernetesHook`` talk to it (``tests/cluster_site``). Each pod the
operator made is recorded (``Namespace.pods``): its manifest as the operator built it, its exit
code, its main container's log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import select
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testkit import expansion

XCOM_CONTAINER = "airflow-xcom-sidecar"
MAIN_CONTAINER = "base"
DEFAULT_GRACE_S = 30
TIER_LABEL = "vqa-test-namespace"  # on every pod podman plays for a namespace: what its clean-up removes, and nothing else


def podman(
    *args: str, env: Mapping[str, str], check: bool = True, timeout: float | None = 300, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``podman <args>`` with the tier's configuration (``CONTAINERS_CONF``)."""
    proc = subprocess.run(
        ["podman", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=stdin is None,
        check=False,
        timeout=timeout,
        input=stdin,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed ({proc.returncode}): {proc.stderr}")
    return proc  # type: ignore[return-value]


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number: ``500m`` → 0.5, ``4Gi`` → 4·2³⁰, ``1G`` → 10⁹."""
    text = str(value)
    suffixes = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "Ei": 2**60,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "E": 1e18,
        "m": 1e-3,
    }
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@dataclass
class Claim:
    """A PersistentVolumeClaim's bound volume: a folder here, as its storage presents it (owner, mode, whether fsGroup applies)."""

    path: str
    uid: int = 0
    gid: int = 0
    mode: int = 0o755
    supports_fs_group: bool = True


@dataclass
class Service:
    """A Service of the namespace: where it answers (the address pods reach it at) and its ports, for the service-link variables."""

    host: str
    ports: dict[str, int]


KUBERNETES_SERVICE = Service(host="10.96.0.1", ports={"https": 443})


@dataclass
class Node:
    """A node of the cluster: what the scheduler matches a pod against."""

    name: str = "node-1"
    labels: dict[str, str] = field(default_factory=lambda: {"kubernetes.io/hostname": "node-1", "kubernetes.io/os": "linux"})
    taints: list[dict[str, str]] = field(default_factory=list)
    allocatable: dict[str, str] = field(
        default_factory=lambda: {"cpu": "16", "memory": "64Gi", "ephemeral-storage": "500Gi", "pods": "110"}
    )


@dataclass
class Config:
    """Everything both processes need to know of the namespace; JSON on disk."""

    name: str
    workdir: str
    podman_env: dict[str, str]
    secrets: dict[str, dict[str, str]]
    claims: dict[str, Claim] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=lambda: [Node()])
    network: str = "podman-default-kube-network"
    # resources the caller's account may not touch (RBAC): every call on them is 403, as the API server answers
    forbidden: list[str] = field(default_factory=list)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Config:
        raw = json.loads(Path(path).read_text())
        return cls(
            **{
                **raw,
                "claims": {k: Claim(**v) for k, v in raw["claims"].items()},
                "services": {k: Service(**v) for k, v in raw["services"].items()},
                "nodes": [Node(**node) for node in raw["nodes"]],
            },
        )

    @property
    def record(self) -> Path:
        return Path(self.workdir) / "pods.jsonl"

    @property
    def calls(self) -> Path:
        """Each API call the namespace answered, as RBAC sees it: a JSON line of apiGroup, resource and verb."""
        return Path(self.workdir) / "calls.jsonl"


class Unschedulable(Exception):
    """The scheduler's verdict for a pod no node can take, with its message."""


# ---------------------------------------------------------------------------------------------------------------- the scheduler


def tolerates(tolerations: list[dict[str, Any]], taint: Mapping[str, str]) -> bool:
    """Whether one of ``tolerations`` tolerates ``taint`` (Kubernetes' rules: key and effect match, Exists or Equal value)."""
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            continue
        if toleration.get("operator", "Equal") == "Exists":
            if not toleration.get("key") or toleration["key"] == taint["key"]:
                return True
        elif toleration.get("key") == taint["key"] and toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def unfit(spec: Mapping[str, Any], node: Node) -> list[str]:
    """Why ``node`` cannot take the pod, as the scheduler's filters say it: the first that fails (taints, then the node selector,
    then the requests, each resource short); empty if it can."""
    for taint in node.taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(spec.get("tolerations") or [], taint):
            return [f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"]
    if any(node.labels.get(key) != value for key, value in (spec.get("nodeSelector") or {}).items()):
        return ["node(s) didn't match Pod's node affinity/selector"]
    requested: dict[str, float] = {}
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        # a container's request defaults to its limit (for extended resources, requests must equal limits)
        for name, value in {**(resources.get("limits") or {}), **(resources.get("requests") or {})}.items():
            requested[name] = requested.get(name, 0.0) + quantity(value)
    return [
        f"Insufficient {name}" for name, amount in sorted(requested.items()) if amount > quantity(node.allocatable.get(name, "0"))
    ]


def schedule(spec: Mapping[str, Any], nodes: list[Node]) -> Node:
    """The first of ``nodes`` that takes the pod; Unschedulable, with the scheduler's message, if none does."""
    verdicts = {node.name: unfit(spec, node) for node in nodes}
    for node in nodes:
        if not verdicts[node.name]:
            return node
    counts: dict[str, int] = {}
    for reasons in verdicts.values():
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
    summary = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
    raise Unschedulable(
        f"0/{len(nodes)} nodes are available: {summary}. preemption: 0/{len(nodes)} nodes are available: {len(nodes)} Preemption is not helpful for scheduling."
    )


# ---------------------------------------------------------------------------------------------------------------- the kubelet


@dataclass
class Prepared:
    """A pod made ready for podman: the node it was placed on, the manifest it plays, and the host folders its volumes use."""

    node: str
    manifest: dict[str, Any]
    folders: list[Path]
    tmpfs: list[Path]


def pod_memory_limit(spec: Mapping[str, Any]) -> float | None:
    limits = [quantity(((c.get("resources") or {}).get("limits") or {}).get("memory", 0)) for c in spec.get("containers") or []]
    return sum(limits) if limits and all(limits) else None


def prepare(manifest: Mapping[str, Any], config: Config, pod_dir: Path) -> Prepared:
    """The pod as podman must play it for its containers to see what a kubelet would give them.

    Raises ``expansion.CreateContainerConfigError`` (a missing Secret or key) or ``Unschedulable``
    (no node takes it; a claim that does not exist).
    """
    played = json.loads(json.dumps(manifest))
    played["metadata"].setdefault("labels", {})[TIER_LABEL] = config.uid
    spec = played["spec"]
    for volume in spec.get("volumes") or []:
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is not None and claim not in config.claims:
            n = len(config.nodes)
            raise Unschedulable(
                f'0/{n} nodes are available: persistentvolumeclaim "{claim}" not found. preemption: 0/{n} nodes are '
                f"available: {n} Preemption is not helpful for scheduling."
            )
    node = schedule(spec, config.nodes)

    # the API server's own Service is linked into every container; the namespace's Services unless the pod opts out
    links = service_links(
        {"kubernetes": KUBERNETES_SERVICE, **({} if spec.get("enableServiceLinks") is False else config.services)}
    )
    for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
        env = expansion.environment(container, config.secrets, namespace=config.name, services=links)
        command, args = expansion.command_and_args(container, env)
        if container.get("command"):
            container["command"] = command
        if container.get("args"):
            container["args"] = args
        # literal values as the kubelet resolved them (podman does not expand); Secrets stay references, which podman resolves
        declared = {var["name"] for var in container.get("env") or []}
        resolved = [
            {"name": var["name"], "value": env[var["name"]]} if "valueFrom" not in var else var
            for var in container.get("env") or []
            if var["name"] in env
        ]
        resolved += [
            {"name": name, "value": value}
            for name, value in links.items()
            if name not in declared and name in env and not from_env_from(container, config, name)
        ]
        container["env"] = resolved

    security = spec.get("securityContext") or {}
    fs_group = security.get("fsGroup")
    memory = pod_memory_limit(spec)
    folders, tmpfs = [], []
    volumes = []
    for volume in spec.get("volumes") or []:
        name = volume["name"]
        if "emptyDir" in volume:
            path = pod_dir / "volumes" / name
            path.mkdir(parents=True)
            empty = volume["emptyDir"] or {}
            if empty.get("medium") == "Memory":
                sizes = [s for s in (quantity(empty["sizeLimit"]) if empty.get("sizeLimit") else None, memory) if s]
                size = int(min(sizes)) if sizes else None
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"mode=0777{f',size={size}' if size else ''}", "tmpfs", str(path)], check=True
                )
                tmpfs.append(path)
            path.chmod(0o777)
            if fs_group is not None:
                os.chown(path, -1, int(fs_group))
                path.chmod(0o2777)
            folders.append(path)
        elif "persistentVolumeClaim" in volume:
            claim = config.claims[volume["persistentVolumeClaim"]["claimName"]]
            path = Path(claim.path)
            root = path.stat()
            # fsGroupChangePolicy OnRootMismatch: the kubelet walks the volume unless its root already has the group, rwx for it, setgid
            if (
                fs_group is not None
                and claim.supports_fs_group
                and (root.st_gid != int(fs_group) or root.st_mode & 0o2070 != 0o2070)
            ):
                for item in [path, *path.rglob("*")]:
                    os.chown(item, -1, int(fs_group), follow_symlinks=False)
                    if not item.is_symlink():
                        item.chmod(item.stat().st_mode | 0o060 | (0o2010 if item.is_dir() else 0))
        else:
            raise NotImplementedError(f"volume {name}: only emptyDir and persistentVolumeClaim are modelled here")
        volumes.append({"name": name, "hostPath": {"path": str(path), "type": "Directory"}})
    spec["volumes"] = volumes
    return Prepared(node.name, played, folders, tmpfs)


def from_env_from(container: Mapping[str, Any], config: Config, name: str) -> bool:
    """Whether ``name`` comes from one of the container's ``envFrom`` Secrets (which podman resolves itself)."""
    return any(
        name in config.secrets.get((source.get("secretRef") or {}).get("name", ""), {})
        for source in container.get("envFrom") or []
    )


def service_links(services: Mapping[str, Service]) -> dict[str, str]:
    """The variables the kubelet puts in every container of the namespace for each Service (Docker links' form)."""
    found: dict[str, str] = {}
    for name, service in sorted(services.items()):
        prefix = name.upper().replace("-", "_")
        ports = list(service.ports.items())
        if not ports:
            continue
        found[f"{prefix}_SERVICE_HOST"] = service.host
        found[f"{prefix}_SERVICE_PORT"] = str(ports[0][1])
        found[f"{prefix}_PORT"] = f"tcp://{service.host}:{ports[0][1]}"
        for port_name, port in ports:
            if port_name:
                found[f"{prefix}_SERVICE_PORT_{port_name.upper().replace('-', '_')}"] = str(port)
            found[f"{prefix}_PORT_{port}_TCP"] = f"tcp://{service.host}:{port}"
            found[f"{prefix}_PORT_{port}_TCP_PROTO"] = "tcp"
            found[f"{prefix}_PORT_{port}_TCP_PORT"] = str(port)
            found[f"{prefix}_PORT_{port}_TCP_ADDR"] = service.host
    return found


def oom_killed(container_id: str) -> bool:
    """Whether the kernel's log has an OOM kill in the container's memory cgroup (what the kubelet's OOM watcher reads)."""
    proc = subprocess.run(["dmesg"], capture_output=True, text=True, check=False)
    return any("oom-kill:" in line and f"libpod-{container_id}" in line for line in proc.stdout.splitlines())


# ---------------------------------------------------------------------------------------------------------------- the API server


def _time(text: str | None) -> dt.datetime | None:
    if not text or text.startswith("0001-01-01"):
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    return dt.datetime.fromisoformat(text)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class PodRecord:
    """The API server's copy of one pod: what the operator created, and what became of it."""

    manifest: dict[str, Any]
    uid: str
    created: dt.datetime
    played: bool = False
    waiting: tuple[str, str] | None = None  # (reason, message): the containers could not be created
    unschedulable: str | None = None
    stop_requested: bool = False
    events: list[Any] = field(default_factory=list)
    prepared: Prepared | None = None
    recorded: bool = False
    deleted: bool = False


def matches(labels: Mapping[str, str], selector: str | None) -> bool:
    """Whether ``labels`` satisfy a label selector of equality terms: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class LogStream:
    """A container's log as the API server streams it (``_preload_content=False``): chunks, or lines."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self._proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stream(self, amt: int | None = None, decode_content: bool = True) -> Iterator[bytes]:
        assert self._proc.stdout is not None
        while chunk := self._proc.stdout.read1(65536):
            yield chunk
        self._proc.wait()

    def __iter__(self) -> Iterator[bytes]:
        assert self._proc.stdout is not None
        yield from self._proc.stdout
        self._proc.wait()

    def release_conn(self) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


class ExecSession:
    """An exec into a container (``podman exec``), with the websocket client's interface the operator uses."""

    def __init__(self, argv: list[str], env: Mapping[str, str], *, stdin: bool) -> None:
        self._proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._channels: dict[int, list[bytes]] = {1: [], 2: []}
        self._all: list[bytes] = []
        self._open = {1: True, 2: True}

    def _pump(self, timeout: float) -> None:
        streams = {self._proc.stdout.fileno(): 1, self._proc.stderr.fileno(): 2}  # type: ignore[union-attr]
        live = [fd for fd, channel in streams.items() if self._open[channel]]
        if not live:
            return
        ready, _, _ = select.select(live, [], [], timeout)
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                self._channels[streams[fd]].append(data)
                self._all.append(data)
            else:
                self._open[streams[fd]] = False

    def is_open(self) -> bool:
        return any(self._open.values())

    def update(self, timeout: float = 0) -> None:
        self._pump(timeout)

    def _peek(self, channel: int, timeout: float) -> bool:
        self.update(timeout)
        return bool(self._channels[channel])

    def _read(self, channel: int) -> str:
        data, self._channels[channel] = b"".join(self._channels[channel]), []
        return data.decode()

    def peek_stdout(self, timeout: float = 0) -> bool:
        return self._peek(1, timeout)

    def peek_stderr(self, timeout: float = 0) -> bool:
        return self._peek(2, timeout)

    def read_stdout(self, timeout: float | None = None) -> str:
        return self._read(1)

    def read_stderr(self, timeout: float | None = None) -> str:
        return self._read(2)

    def read_all(self) -> str:
        data, self._all = b"".join(self._all), []
        self._channels = {1: [], 2: []}
        return data.decode()

    def run_forever(self, timeout: float | None = None) -> None:
        while self.is_open():
            self.update(timeout=1)
        self._proc.wait()

    def write_stdin(self, data: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(data.encode())
        self._proc.stdin.flush()

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def close(self, **kwargs: Any) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()


@dataclass
class _Response:
    """What ``ApiClient.deserialize`` reads: a response's body."""

    data: str


class CoreV1:
    """The part of ``kubernetes.client.CoreV1Api`` the pod operator uses, answered by podman for one namespace."""

    def __init__(self, config: Config) -> None:
        from kubernetes.client import ApiClient

        self.config = config
        self.api_client = ApiClient()  # kubernetes.stream swaps its request method for an exec; we answer the exec directly
        self._pods: dict[str, PodRecord] = {}
        self._lock = threading.RLock()
        self._version = 0

    # -- helpers

    def _podman(self, *args: str, check: bool = True, timeout: float | None = 300) -> subprocess.CompletedProcess[str]:
        return podman(*args, env=self.config.podman_env, check=check, timeout=timeout)

    def _not_found(self, name: str) -> Exception:
        from kubernetes.client.exceptions import ApiException

        err = ApiException(status=404, reason="Not Found")
        err.body = json.dumps(
            {"kind": "Status", "status": "Failure", "message": f'pods "{name}" not found', "reason": "NotFound", "code": 404}
        )
        return err

    def _record(self, name: str, namespace: str) -> PodRecord:
        record = self._pods.get(name)
        if record is None or record.deleted or namespace != self.config.name:
            raise self._not_found(name)
        return record

    def _call(self, resource: str, *verbs: str, group: str = "") -> None:
        """Record a call as the API server's authorizer sees it (``Config.calls``); 403 on a resource the account may not touch."""
        from kubernetes.client.exceptions import ApiException

        if resource in self.config.forbidden:
            raise ApiException(
                status=403,
                reason=f'{resource} is forbidden: User "system:serviceaccount:airflow:airflow-worker" cannot {verbs[0]} resource "{resource}"',
            )
        with self._lock, self.config.calls.open("a", encoding="utf-8") as out:
            for verb in verbs:
                out.write(json.dumps({"apiGroup": group, "resource": resource, "verb": verb}) + "\n")

    def _event(self, record: PodRecord, reason: str, message: str, kind: str = "Normal", container: str | None = None) -> None:
        from kubernetes.client import models as k8s

        self._version += 1
        meta = record.manifest["metadata"]
        field_path = f"spec.containers{{{container}}}" if container else None
        record.events.append(
            k8s.CoreV1Event(
                metadata=k8s.V1ObjectMeta(
                    name=f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                    namespace=self.config.name,
                    resource_version=str(self._version),
                    uid=str(uuid.uuid4()),
                ),
                involved_object=k8s.V1ObjectReference(
                    kind="Pod", name=meta["name"], namespace=self.config.name, uid=record.uid, field_path=field_path
                ),
                reason=reason,
                message=message,
                type=kind,
                count=1,
                first_timestamp=_now(),
                last_timestamp=_now(),
            )
        )

    # -- create

    def create_namespaced_pod(self, namespace: str, body: Any, **kwargs: Any) -> Any:
        """Admit the pod (schema), schedule it, let the kubelet prepare it, and play it; a pod that cannot start stays Pending."""
        self._call("pods", "create")
        import kubernetes_validate
        from kubernetes.client.exceptions import ApiException

        manifest = body if isinstance(body, dict) else self.api_client.sanitize_for_serialization(body)
        manifest = json.loads(json.dumps(manifest))
        name = manifest["metadata"]["name"]
        if namespace != self.config.name:
            raise ApiException(status=404, reason=f'namespaces "{namespace}" not found')
        try:
            kubernetes_validate.validate(manifest, "1.33", strict=True)
        except kubernetes_validate.ValidationError as err:  # the API server's answer to a pod its schema refuses
            raise ApiException(status=422, reason=f"Pod {name!r} is invalid: {err}") from None
        with self._lock:
            if name in self._pods and not self._pods[name].deleted:
                raise ApiException(status=409, reason=f'pods "{name}" already exists')
            record = PodRecord(manifest=manifest, uid=str(uuid.uuid4()), created=_now())
            self._pods[name] = record
        pod_dir = Path(self.config.workdir) / "pods" / name
        try:
            record.prepared = prepare(manifest, self.config, pod_dir)
        except Unschedulable as err:
            record.unschedulable = str(err)
            self._event(record, "FailedScheduling", str(err), kind="Warning")
            self._write_record(record, None, "")
            return self._read_pod(name, namespace)
        except expansion.CreateContainerConfigError as err:
            record.waiting = ("CreateContainerConfigError", str(err))
            self._event(record, "Failed", f"Error: {err}", kind="Warning", container=MAIN_CONTAINER)
            self._write_record(record, None, "")
            return self._read_pod(name, namespace)
        self._event(record, "Scheduled", f"Successfully assigned {namespace}/{name} to {record.prepared.node}")
        for container in manifest["spec"]["containers"]:
            image = container["image"]
            if self._podman("image", "exists", image, check=False).returncode != 0:
                record.waiting = (
                    "ErrImagePull",
                    f'failed to pull and unpack image "{image}": no registry can be reached from this cluster',
                )
                self._event(
                    record,
                    "Failed",
                    f'Failed to pull image "{image}": {record.waiting[1]}',
                    kind="Warning",
                    container=container["name"],
                )
                self._write_record(record, None, "")
                return self._read_pod(name, namespace)
        path = pod_dir / "pod.yaml"
        path.write_text(json.dumps(record.prepared.manifest))
        proc = self._podman("kube", "play", "--network", self.config.network, str(path), check=False)
        record.played = True
        if proc.returncode != 0 and not self._container_states(record):  # nothing was created: the runtime refused the pod
            record.waiting = (
                "CreateContainerError",
                proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "podman kube play failed",
            )
            self._event(record, "Failed", f"Error: {record.waiting[1]}", kind="Warning", container=MAIN_CONTAINER)
        for container in manifest["spec"]["containers"]:
            self._event(record, "Created", f"Created container {container['name']}", container=container["name"])
            self._event(record, "Started", f"Started container {container['name']}", container=container["name"])
        return self._read_pod(name, namespace)

    # -- read

    def _container_states(self, record: PodRecord) -> dict[str, dict[str, Any]]:
        name = record.manifest["metadata"]["name"]
        names = [f"{name}-{c['name']}" for c in record.manifest["spec"]["containers"]]
        proc = self._podman("container", "inspect", *names, check=False)
        found = {}
        for info in json.loads(proc.stdout or "[]"):
            found[info["Name"].removeprefix(f"{name}-")] = info
        return found

    def _status(self, record: PodRecord) -> Any:
        from kubernetes.client import models as k8s

        spec = record.manifest["spec"]
        if record.unschedulable:
            condition = k8s.V1PodCondition(
                type="PodScheduled", status="False", reason="Unschedulable", message=record.unschedulable
            )
            return k8s.V1PodStatus(phase="Pending", conditions=[condition])
        scheduled = k8s.V1PodCondition(type="PodScheduled", status="True")
        statuses = []
        if record.waiting is not None:
            reason, message = record.waiting
            for container in spec["containers"]:
                state = k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason=reason, message=message))
                statuses.append(
                    k8s.V1ContainerStatus(
                        name=container["name"], image=container["image"], image_id="", ready=False, restart_count=0, state=state
                    )
                )
            return k8s.V1PodStatus(phase="Pending", conditions=[scheduled], container_statuses=statuses)
        infos = self._container_states(record)
        if not infos:  # its containers are gone: removed behind the API server's back, as if the node had died
            return k8s.V1PodStatus(
                phase="Failed", reason="NodeLost", message="the pod's containers no longer exist", conditions=[scheduled]
            )
        phases = []
        for container in spec["containers"]:
            info = infos.get(container["name"])
            state_info = (info or {}).get("State") or {}
            status = state_info.get("Status")
            if status == "running":
                state = k8s.V1ContainerState(running=k8s.V1ContainerStateRunning(started_at=_time(state_info.get("StartedAt"))))
                phases.append("running")
            elif state_info.get("Error") and not _time(state_info.get("StartedAt")):
                # the runtime could not start the process (no such workdir, executable ...): what containerd reports as StartError
                state = k8s.V1ContainerState(
                    terminated=k8s.V1ContainerStateTerminated(
                        exit_code=128,
                        reason="StartError",
                        message=state_info["Error"],
                        finished_at=_time(state_info.get("FinishedAt")),
                    )
                )
                phases.append("failed")
            elif status in ("exited", "stopped"):
                code = int(state_info.get("ExitCode", 0))
                reason = "Completed" if code == 0 else "Error"
                if code == 137 and not record.stop_requested and oom_killed(info["Id"]):
                    reason = "OOMKilled"
                message = None
                if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                    message = self._logs(record.manifest["metadata"]["name"], container["name"], tail=80)[-2048:] or None
                state = k8s.V1ContainerState(
                    terminated=k8s.V1ContainerStateTerminated(
                        exit_code=code,
                        reason=reason,
                        message=message,
                        started_at=_time(state_info.get("StartedAt")),
                        finished_at=_time(state_info.get("FinishedAt")),
                    )
                )
                phases.append("failed" if code else "succeeded")
            else:
                state = k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason="ContainerCreating"))
                phases.append("waiting")
            statuses.append(
                k8s.V1ContainerStatus(
                    name=container["name"],
                    image=container["image"],
                    image_id=(info or {}).get("Image", ""),
                    ready=status == "running",
                    restart_count=0,
                    state=state,
                    started=status == "running",
                )
            )
        if "running" in phases:
            phase = "Running"
        elif "waiting" in phases:
            phase = "Pending"
        elif "failed" in phases:
            phase = "Failed"
        else:
            phase = "Succeeded"
        return k8s.V1PodStatus(
            phase=phase, conditions=[scheduled], container_statuses=statuses, start_time=record.created, host_ip="10.0.0.1"
        )

    def read_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> Any:
        self._call("pods", "get")
        return self._read_pod(name, namespace)

    def _read_pod(self, name: str, namespace: str) -> Any:
        from kubernetes.client import models as k8s

        with self._lock:
            record = self._record(name, namespace)
        status = self._status(record)
        pod = self.api_client.deserialize(_Response(json.dumps(record.manifest)), "V1Pod")
        pod.metadata.uid = record.uid
        pod.metadata.creation_timestamp = record.created
        pod.metadata.resource_version = str(self._version)
        pod.spec.node_name = record.prepared.node if record.prepared else None
        pod.status = status
        code = self._main_exit_code(status)
        if not record.recorded and (
            code is not None or status.phase in ("Succeeded", "Failed")
        ):  # the worker has finished: its code and log are final
            self._write_record(record, code, self._logs(name, MAIN_CONTAINER))
        assert isinstance(pod, k8s.V1Pod)
        return pod

    @staticmethod
    def _main_exit_code(status: Any) -> int | None:
        for container in status.container_statuses or []:
            if container.name == MAIN_CONTAINER and container.state.terminated is not None:
                return int(container.state.terminated.exit_code)
        return None

    def _write_record(self, record: PodRecord, exit_code: int | None, logs: str) -> None:
        """Append what became of the pod to the namespace's record (once), for the tests to read."""
        labels = record.manifest["metadata"].get("labels") or {}
        entry = {
            "name": record.manifest["metadata"]["name"],
            "task_id": labels.get("task_id"),
            "map_index": int(labels.get("map_index", -1)),
            "try_number": labels.get("try_number"),
            "exit_code": exit_code,
            "waiting": list(record.waiting) if record.waiting else None,
            "unschedulable": record.unschedulable,
            "node": record.prepared.node if record.prepared else None,
            "manifest": record.manifest,
            "logs": logs,
        }
        record.recorded = True
        with self.config.record.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")

    def list_namespaced_pod(self, namespace: str, label_selector: str | None = None, **kwargs: Any) -> Any:
        self._call("pods", "list")
        from kubernetes.client import models as k8s

        with self._lock:
            names = [
                n
                for n, r in self._pods.items()
                if not r.deleted and matches(r.manifest["metadata"].get("labels") or {}, label_selector)
            ]
        return k8s.V1PodList(items=[self._read_pod(n, namespace) for n in names] if namespace == self.config.name else [])

    def patch_namespaced_pod(self, name: str, namespace: str, body: Mapping[str, Any], **kwargs: Any) -> Any:
        self._call("pods", "patch")
        with self._lock:
            record = self._record(name, namespace)
            labels = (body.get("metadata") or {}).get("labels") or {}
            record.manifest["metadata"].setdefault("labels", {}).update(labels)
        return self._read_pod(name, namespace)

    # -- Secrets

    def read_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> Any:
        """A Secret of the namespace (its data base64-encoded, as the API gives it), or 404."""
        import base64

        from kubernetes.client import models as k8s
        from kubernetes.client.exceptions import ApiException

        self._call("secrets", "get")
        data = self.config.secrets.get(name) if namespace == self.config.name else None
        if data is None:
            raise ApiException(status=404, reason=f'secrets "{name}" not found')
        return k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        )

    # -- logs, events, exec

    def _logs(self, name: str, container: str, *, tail: int | None = None) -> str:
        """The container's log, stdout and stderr in the order they were written."""
        argv = ["podman", "logs", *(["--tail", str(tail)] if tail else []), f"{name}-{container}"]
        proc = subprocess.run(
            argv,
            env={**os.environ, **self.config.podman_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        return proc.stdout if proc.returncode == 0 else ""

    def read_namespaced_pod_log(
        self,
        name: str,
        namespace: str,
        container: str | None = None,
        follow: bool = False,
        timestamps: bool = False,
        since_seconds: int | None = None,
        tail_lines: int | None = None,
        _preload_content: bool = True,
        **kwargs: Any,
    ) -> Any:
        from kubernetes.client.exceptions import ApiException

        self._call("pods/log", "get")

        with self._lock:
            record = self._record(name, namespace)
        container = container or MAIN_CONTAINER
        if not record.played or record.waiting:
            raise ApiException(
                status=400,
                reason=f'container "{container}" in pod "{name}" is waiting to start: {(record.waiting or ("ContainerCreating",))[0]}',
            )
        argv = ["podman", "logs", *(["--follow"] if follow else []), *(["--timestamps"] if timestamps else [])]
        argv += [
            *(["--since", f"{since_seconds}s"] if since_seconds else []),
            *(["--tail", str(tail_lines)] if tail_lines else []),
            f"{name}-{container}",
        ]
        stream = LogStream(argv, self.config.podman_env)
        if _preload_content:
            return b"".join(stream.stream()).decode()
        return stream

    def list_namespaced_event(
        self, namespace: str, field_selector: str | None = None, resource_version: str | None = None, **kwargs: Any
    ) -> Any:
        self._call("events", "list")
        from kubernetes.client import models as k8s

        wanted = dict(term.split("=", 1) for term in (field_selector or "").split(",") if "=" in term)
        with self._lock:
            events = [
                e
                for r in self._pods.values()
                for e in r.events
                if wanted.get("involvedObject.name", e.involved_object.name) == e.involved_object.name
            ]
        if resource_version:
            events = [e for e in events if int(e.metadata.resource_version) > int(resource_version)]
        return k8s.CoreV1EventList(items=events, metadata=k8s.V1ListMeta(resource_version=str(self._version)))

    def connect_get_namespaced_pod_exec(
        self, name: str, namespace: str, command: list[str], container: str | None = None, stdin: bool = False, **kwargs: Any
    ) -> ExecSession:
        # the client opens an exec with a GET upgraded to a WebSocket: Kubernetes from 1.31 authorizes it as create, older ones as get
        self._call("pods/exec", "create", "get")
        with self._lock:
            self._record(name, namespace)
        argv = ["podman", "exec", *(["-i"] if stdin else []), f"{name}-{container or MAIN_CONTAINER}", *command]
        return ExecSession(argv, self.config.podman_env, stdin=stdin)

    # -- delete

    def delete_namespaced_pod(
        self, name: str, namespace: str, body: Any = None, grace_period_seconds: int | None = None, **kwargs: Any
    ) -> Any:
        """Stop the pod's containers (SIGTERM, then SIGKILL after the grace period) and remove it with its volumes' folders."""
        self._call("pods", "delete")
        with self._lock:
            record = self._record(name, namespace)
            record.stop_requested = True
        grace = grace_period_seconds if grace_period_seconds is not None else getattr(body, "grace_period_seconds", None)
        if grace is None:
            grace = record.manifest["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
        if record.played:
            status = self._status(record)
            if not record.recorded and status.phase in ("Succeeded", "Failed"):
                self._write_record(record, self._main_exit_code(status), self._logs(name, MAIN_CONTAINER))
            self._event(record, "Killing", f"Stopping container {MAIN_CONTAINER}", container=MAIN_CONTAINER)
            stop_pod(name, [c["name"] for c in record.manifest["spec"]["containers"]], int(grace), self.config.podman_env)
            if not record.recorded:
                status = self._status(record)
                self._write_record(record, self._main_exit_code(status), self._logs(name, MAIN_CONTAINER))
            self._podman("pod", "rm", "--force", name, check=False)
        release(record.prepared)
        with self._lock:
            record.deleted = True
        return None


def stop_pod(name: str, containers: list[str], grace: int, env: Mapping[str, str]) -> None:
    """Stop a pod as the kubelet does: SIGTERM to every container at once, SIGKILL to those still running after ``grace`` seconds,
    and only then the pod's sandbox (its network). ``podman pod stop`` may stop the sandbox first, cutting off a container's
    network while it still has writes to finish."""
    stoppers = [
        threading.Thread(
            target=podman,
            args=("stop", "--time", str(grace), f"{name}-{container}"),
            kwargs={"env": env, "check": False, "timeout": grace + 60},
        )
        for container in containers
    ]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()
    podman("pod", "stop", "--time", "0", name, env=env, check=False)


def release(prepared: Prepared | None) -> None:
    """Unmount a pod's memory-backed volumes and remove its folders."""
    if prepared is None:
        return
    for path in prepared.tmpfs:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)
    for path in prepared.folders:
        shutil.rmtree(path.parent.parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------- set-up


def host_address() -> str:
    """This machine's address on its network: what the pods reach its servers at (never 127.0.0.1, which is the pod itself)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.254", 9))  # no packet is sent: this only asks which source address the route would use
        return str(probe.getsockname()[0])


@dataclass
class Namespace:
    """The pytest side of one namespace: set up, read back, torn down."""

    config: Config
    path: Path

    @classmethod
    def create(
        cls,
        config: Config,
        *,
        images: Mapping[str, str],
    ) -> Namespace:
        """Create the Secrets (podman secrets), make the claims' folders, tag the images with the names pods ask for."""
        workdir = Path(config.workdir)
        (workdir / "pods").mkdir(parents=True, exist_ok=True)
        namespace = cls(config, workdir / "cluster.json")
        for name, data in list(config.secrets.items()):
            namespace.put_secret(name, data)
        for name, claim in list(config.claims.items()):
            namespace.put_claim(name, claim)
        for name, image in images.items():
            podman("tag", image, name, env=config.podman_env)
        namespace.save()
        return namespace

    def save(self) -> None:
        """Write the config again after a change (a Secret, a claim, the node), for the next run's process."""
        self.config.dump(self.path)

    def put_secret(self, name: str, data: Mapping[str, str]) -> None:
        """Create (or replace) a Secret: a podman secret (key → base64, as podman's kube play reads it), and the kubelet's copy."""
        import base64

        podman("secret", "rm", name, env=self.config.podman_env, check=False)
        encoded = json.dumps({key: base64.b64encode(value.encode()).decode() for key, value in data.items()}).encode()
        podman("secret", "create", name, "-", env=self.config.podman_env, stdin=encoded)
        self.config.secrets[name] = dict(data)
        self.save()

    def delete_secret(self, name: str) -> dict[str, str]:
        """Delete a Secret; what it held."""
        podman("secret", "rm", name, env=self.config.podman_env, check=False)
        data = self.config.secrets.pop(name)
        self.save()
        return data

    def put_claim(self, name: str, claim: Claim) -> Claim | None:
        """Bind a claim to a volume (its folder made as its storage presents it); the claim it replaced."""
        path = Path(claim.path)
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, claim.uid, claim.gid)
        path.chmod(claim.mode)
        old = self.config.claims.get(name)
        self.config.claims[name] = claim
        self.save()
        return old

    def evict(self, name: str, grace_s: int | None = None) -> None:
        """What the kubelet does to a pod it evicts or a preempted node's pods: SIGTERM, the grace period, then SIGKILL."""
        spec = json.loads((Path(self.config.workdir) / "pods" / name / "pod.yaml").read_text())["spec"]
        grace = grace_s if grace_s is not None else spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
        stop_pod(name, [c["name"] for c in spec["containers"]], int(grace), self.config.podman_env)

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` of an ``airflow dags test`` whose pods this namespace runs."""
        root = Path(__file__).resolve().parents[1]
        return {
            **env,
            **self.config.podman_env,
            "VQA_EXECUTION": "kubernetes",
            "VQA_NAMESPACE": self.config.name,
            "VQA_TEST_CLUSTER": str(self.path),
            "PYTHONPATH": f"{root / 'tests' / 'cluster_site'}:{root / 'plugins'}:{root}",
        }

    def calls(self) -> set[tuple[str, str, str]]:
        """Every (apiGroup, resource, verb) the namespace was asked for so far."""
        path = self.config.calls
        return (
            {(c["apiGroup"], c["resource"], c["verb"]) for c in map(json.loads, path.read_text().splitlines())}
            if path.exists()
            else set()
        )

    def pods(self) -> list[dict[str, Any]]:
        """Every pod the operator made so far, with what became of it."""
        record = self.config.record
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    def running(self) -> list[str]:
        """The names of this namespace's pods whose main container runs now."""
        proc = podman(
            "pod", "ps", "--filter", f"label={TIER_LABEL}={self.config.uid}", "--format", "{{.Name}}", env=self.config.podman_env
        )
        names = proc.stdout.split()
        if not names:
            return []
        states = podman(
            "container",
            "inspect",
            "--format",
            "{{.Name}} {{.State.Status}}",
            *(f"{n}-{MAIN_CONTAINER}" for n in names),
            env=self.config.podman_env,
            check=False,
        )
        return [
            line.split()[0].removesuffix(f"-{MAIN_CONTAINER}")
            for line in states.stdout.splitlines()
            if line.split()[-1] == "running"
        ]

    def remove_pods(self) -> None:
        """Remove every pod of this namespace left (the operator keeps failed pods, as on a cluster) and their volumes' folders."""
        listed = podman(
            "pod", "ps", "--filter", f"label={TIER_LABEL}={self.config.uid}", "--format", "{{.Name}}", env=self.config.podman_env
        )
        for name in listed.stdout.split():
            podman("pod", "rm", "--force", "--time", "0", name, env=self.config.podman_env, check=False)
        pods = Path(self.config.workdir) / "pods"
        for mount in Path("/proc/mounts").read_text().splitlines():
            target = mount.split()[1]
            if target.startswith(str(pods)):
                subprocess.run(["umount", target], check=False, capture_output=True)
        shutil.rmtree(pods, ignore_errors=True)
        pods.mkdir(parents=True, exist_ok=True)


def install(config_path: str) -> CoreV1:
    """Make every ``KubernetesHook`` of this process (``airflow dags test``) talk to the namespace instead of a cluster."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    client = CoreV1(Config.load(config_path))
    KubernetesHook.core_v1_client = property(lambda self: client)  # type: ignore[assignment,method-assign]
    KubernetesHook.is_in_cluster = property(lambda self: False)  # type: ignore[assignment,method-assign]
    KubernetesHook.get_namespace = lambda self: client.config.name  # type: ignore[method-assign]
    return client
