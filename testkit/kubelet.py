"""A stand-in for the kubelet: run a pod's container on this machine exactly as its spec stands.

No Kubernetes control plane can run here, so a pod manifest (what ``build_pod_request_obj`` makes)
is run the way a kubelet would run it, as strictly as one machine allows:

- **only what the spec carries** reaches the process: the image's ``ENV`` (read from its
  Dockerfile), then the container's ``envFrom`` Secrets, then its ``env`` (literal values and
  ``secretKeyRef``s, resolved from the test's Secrets); nothing of the caller's environment. A
  missing Secret or key fails the pod, as ``CreateContainerConfigError`` does;
- the container's own ``command`` and ``args``, with ``$(VAR)`` expanded in them and in the env
  values as the kubelet does (``testkit.expansion``);
- its volumes: each ``emptyDir`` a fresh folder, each ``persistentVolumeClaim`` a folder per claim,
  bind-mounted at its ``mountPath`` in a mount namespace of the pod's own, over a root file system
  that is read-only when ``readOnlyRootFilesystem`` says so;
- its user: ``runAsUser``/``runAsGroup``, no supplementary groups, no new privileges and no
  capabilities when the security context drops them (``setpriv``);
- the XCom sidecar's file (``/airflow/xcom/return.json``) is read back after the container exits.

What stands for the image itself is a local environment (``Image.bin_dir``: where its ``python3``
is, standing for the image's own ``PATH``), so the code that runs is what is installed there. The
network is this machine's: servers on loopback are reachable as a cluster Service would be.

Creates the mount points a spec names that this machine lacks (``/airflow/xcom``, ``/models``) and
its own staging folder (``/var/lib/vqa-kubelet``) as empty folders; they are only ever mounted over.
The environment standing for the image is mounted back at its own path, read-only, after the
pod's volumes: a checkout under /tmp stays reachable although the pod's /tmp is an emptyDir.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit import expansion

XCOM_CONTAINER = "airflow-xcom-sidecar"
# where the image's folders wait, in the pod's mount namespace, while its volumes are mounted (an empty folder on this machine)
STAGE = "/var/lib/vqa-kubelet"
XCOM_PATH = "/airflow/xcom/return.json"


class PodSpecError(Exception):
    """The pod could not start as specified (a missing Secret or key, an unsupported volume): a kubelet would refuse it too."""


@dataclass(frozen=True)
class Image:
    """What a container image provides: an environment standing for its file system, its ``ENV``, its ``USER``."""

    bin_dir: Path
    env: dict[str, str]
    user: str | None = None

    @property
    def interpreter(self) -> Path:
        """Where the environment's Python is installed (``sys.base_prefix``): the image's own, readable by every user."""
        out = subprocess.run([str(self.bin_dir / "python3"), "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())

    @classmethod
    def from_dockerfile(cls, dockerfile: Path, bin_dir: Path) -> Image:
        """The final stage's ``ENV`` and ``USER`` of ``dockerfile`` (``ARG`` defaults substituted), over ``bin_dir``."""
        text = re.sub(r"\\\n", " ", dockerfile.read_text())
        args: dict[str, str] = {}
        env: dict[str, str] = {}
        user = None
        for line in text.splitlines():
            words = line.strip().split(None, 1)
            if len(words) < 2 or line.strip().startswith("#"):
                continue
            instruction, rest = words[0].upper(), words[1]
            if instruction == "FROM":
                args, env, user = {}, {}, None  # each stage starts afresh; the last one is the image
            elif instruction == "ARG":
                name, _, default = rest.partition("=")
                args[name.strip()] = default.strip().strip('"')
            elif instruction == "ENV":
                for pair in shlex.split(rest):
                    name, _, value = pair.partition("=")
                    env[name] = _substitute(value, {**args, **env})
            elif instruction == "USER":
                user = _substitute(rest.strip(), args)
        return cls(bin_dir=bin_dir, env=env, user=user)


def _substitute(value: str, known: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: known.get(m.group(1) or m.group(2), ""), value)


@dataclass
class PodRun:
    """What came of one pod: its container's exit code and output, and the XCom file it left."""

    name: str
    exit_code: int
    logs: str
    xcom: Any
    env: dict[str, str]
    manifest: dict[str, Any]


@dataclass
class Kubelet:
    """Runs pod manifests with the ``secrets`` of the namespace (name -> key -> value) and ``image`` standing for every image."""

    image: Image
    secrets: dict[str, dict[str, str]]
    workdir: Path
    timeout: float = 600.0
    runs: list[PodRun] = field(default_factory=list)

    def environment(self, container: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
        """The container's environment as the kubelet makes it (``testkit.expansion``), and the process's: the image's ENV below it."""
        try:
            env = expansion.environment(container, self.secrets)
        except expansion.CreateContainerConfigError as err:
            raise PodSpecError(str(err)) from None
        return env, {"PATH": f"{self.image.bin_dir}:/usr/local/bin:/usr/bin:/bin", **self.image.env, **env}

    def volumes(self, spec: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        """A host folder for each of the pod's volumes: emptyDir fresh per pod, a claim's shared across pods."""
        found = {}
        for volume in spec.get("volumes") or []:
            if "emptyDir" in volume:
                path = pod_dir / "volumes" / volume["name"]
            elif "persistentVolumeClaim" in volume:
                path = self.workdir / "claims" / volume["persistentVolumeClaim"]["claimName"]
            else:
                raise PodSpecError(f"volume {volume['name']}: only emptyDir and persistentVolumeClaim are supported here")
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)  # as Kubernetes makes an emptyDir: writable by the pod's user
            found[volume["name"]] = path
        return found

    def _image_paths(self) -> list[Path]:
        """The folders that stand for the image's file system: the interpreter's installation and the environment on top of it."""
        found: list[Path] = []
        for path in (self.image.interpreter, self.image.bin_dir.parent.resolve()):
            if not any(path == other or path.is_relative_to(other) for other in found):
                found.append(path)
        return found

    def _stage_image(self) -> list[str]:
        """Mounts that keep the image's folders reachable before the pod's volumes go over the file system (its /tmp may hide them)."""
        script = [f"mount -t tmpfs -o mode=0755 tmpfs {STAGE}"]
        for index, path in enumerate(self._image_paths()):
            script += [f"mkdir {STAGE}/{index}", f"mount --bind {shlex.quote(str(path))} {STAGE}/{index}"]
        return script

    def _mount_image(self) -> list[str]:
        """The image's folders back at their paths, read-only and readable by any user, as an image's files are.

        A private folder above one (this machine's /root, say) is covered by an empty, traversable
        tmpfs first: the pod sees the image's folders and nothing else of it.
        """
        script = []
        paths = self._image_paths()
        covered: set[Path] = set()
        for path in paths:
            private = next((a for a in reversed(path.parents) if a != Path("/") and not os.stat(a).st_mode & 0o001), None)
            if private is not None and private not in covered:
                covered.add(private)
                script.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(private))}")
        for index, path in enumerate(paths):
            target = shlex.quote(str(path))
            script += [f"mkdir -p {target}", f"mount --bind {STAGE}/{index} {target}", f"mount -o remount,bind,ro {target}"]
        return script

    def run(self, manifest: dict[str, Any]) -> PodRun:
        """Run the pod's main container to its end, as its spec stands; the XCom sidecar is read back, not run."""
        spec = manifest["spec"]
        name = manifest["metadata"]["name"]
        containers = [c for c in spec["containers"] if c["name"] != XCOM_CONTAINER]
        if len(containers) != 1:
            raise PodSpecError(f"pod {name}: expected one container beside the XCom sidecar, got {[c['name'] for c in containers]}")
        container = containers[0]
        pod_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        kubelet_env, env = self.environment(container)
        host = self.volumes(spec, pod_dir)
        mounts = [(host[m["name"]], m["mountPath"]) for m in container.get("volumeMounts") or []]
        # the sidecar shares the xcom volume with the main container: where the worker writes its manifest
        xcom_dir = next((source for source, target in mounts if target == os.path.dirname(XCOM_PATH)), None)
        pod_security = spec.get("securityContext") or {}
        security = {**pod_security, **(container.get("securityContext") or {})}
        os.makedirs(STAGE, exist_ok=True)
        # the kubelet expands $(VAR) in command and args from the container's environment (not the image's ENV)
        command, args = expansion.command_and_args(container, kubelet_env)
        argv = [*command, *args]
        if not argv:
            raise PodSpecError(f"pod {name}: no command (the image's ENTRYPOINT is not modelled here)")
        script = ["set -e", *self._stage_image()]
        # a mount over an ancestor of another mount's source (/tmp over this machine's temp folders) goes last
        sources = [str(source) for source, _ in mounts]
        mounts.sort(key=lambda m: any(source.startswith(m[1].rstrip("/") + "/") for source in sources))
        for source, target in mounts:
            os.makedirs(target, exist_ok=True)
            script.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
        script += self._mount_image()
        if security.get("readOnlyRootFilesystem"):
            script.append("mount -o remount,bind,ro /")
        user = security.get("runAsUser")
        if user is None and self.image.user:
            user = self.image.user.split(":")[0]
        group = security.get("runAsGroup", user)
        if security.get("runAsNonRoot") and str(user or "0") == "0":
            raise PodSpecError(f"pod {name}: runAsNonRoot, but the container would run as root")
        priv = ["setpriv"]
        if user is not None:
            priv += [f"--reuid={user}", f"--regid={group}", "--clear-groups"]
        if security.get("allowPrivilegeEscalation") is False:
            priv.append("--no-new-privs")
        if "ALL" in ((security.get("capabilities") or {}).get("drop") or []):
            priv += ["--inh-caps=-all", "--bounding-set=-all"]
        # the working folder of the image's processes: / unless the image says otherwise
        script.append("cd /")
        script.append(shlex.join([*priv, "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]))
        try:
            proc = subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
                capture_output=True, text=True, timeout=self.timeout, check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
            exit_code, logs = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            exit_code, logs = 137, f"{err.stdout or ''}{err.stderr or ''}\nkilled after {self.timeout:.0f}s"
        xcom = None
        if xcom_dir is not None and (xcom_dir / "return.json").exists():
            xcom = json.loads((xcom_dir / "return.json").read_text())
        result = PodRun(name=name, exit_code=exit_code, logs=logs, xcom=xcom, env=env, manifest=manifest)
        self.runs.append(result)
        return result


def finished_pod(pod: Any, run: PodRun) -> Any:
    """The pod as the API server would report it after its container exited: its phase and the container's last state."""
    from kubernetes.client import models as k8s

    # terminationMessagePolicy FallbackToLogsOnError: the log's tail (at most 80 lines / 2048 bytes) when the container failed
    message = "\n".join(run.logs.splitlines()[-80:])[-2048:] if run.exit_code else None
    terminated = k8s.V1ContainerStateTerminated(exit_code=run.exit_code, message=message, reason="Completed" if run.exit_code == 0 else "Error")
    status = k8s.V1ContainerStatus(name="base", image="w", image_id="w", ready=False, restart_count=0, state=k8s.V1ContainerState(terminated=terminated))
    return k8s.V1Pod(metadata=pod.metadata, spec=pod.spec, status=k8s.V1PodStatus(phase="Succeeded" if run.exit_code == 0 else "Failed", container_statuses=[status]))


def install_in_pod_operator(config_path: str) -> None:
    """Make ``VQAWorkerPodOperator`` hand its pods to a Kubelet instead of a cluster, in this process (``airflow dags test``).

    The pod is built by the operator's own ``build_pod_request_obj`` from the rendered task, checked
    against the Kubernetes schema, run by the Kubelet, and judged by the operator's own ``cleanup``
    (exit codes, the termination message, the XCom of a failed pod). What is replaced is only what
    needs a cluster: creating, watching and deleting the pod, and reading the XCom sidecar. Each run
    is appended to the config's ``record`` file (its manifest, exit code and logs).

    The config (JSON): ``image_bin`` (the environment standing for the image), ``dockerfile`` (the
    image's ENV and USER), ``secrets`` (name -> key -> value), ``workdir``, ``record``.
    """
    import kubernetes_validate
    from kubernetes.client import ApiClient

    from vqa_operators.operators.pod import VQAWorkerPodOperator

    config = json.loads(Path(config_path).read_text())
    kubelet = Kubelet(
        image=Image.from_dockerfile(Path(config["dockerfile"]), Path(config["image_bin"])), secrets=config["secrets"], workdir=Path(config["workdir"]),
    )

    def execute_sync(self: Any, context: Any) -> Any:
        pod = self.build_pod_request_obj(context, dry_run=True)
        manifest = ApiClient().sanitize_for_serialization(pod)
        kubernetes_validate.validate(manifest, "1.33", strict=True)
        run = kubelet.run(manifest)
        for line in run.logs.splitlines():
            self.log.info("[%s] %s", self.base_container_name, line)
        with open(config["record"], "a", encoding="utf-8") as record:
            ti = context["ti"]
            record.write(json.dumps({"task_id": ti.task_id, "map_index": ti.map_index, "exit_code": run.exit_code, "manifest": manifest, "logs": run.logs}) + "\n")
        remote = finished_pod(pod, run)
        self.pod, self.remote_pod = pod, remote
        self.cleanup(pod, remote, xcom_result=run.xcom, context=context)
        return run.xcom

    # the API server's part of cleanup: nothing to delete, label or read events from here
    VQAWorkerPodOperator.execute_sync = execute_sync  # type: ignore[method-assign]
    VQAWorkerPodOperator.process_pod_deletion = lambda self, pod, *, reraise=True: True  # type: ignore[method-assign]
    VQAWorkerPodOperator.patch_already_checked = lambda self, pod, *, reraise=True: None  # type: ignore[method-assign]
    VQAWorkerPodOperator._read_pod_events = lambda self, pod, *, reraise=True: None  # type: ignore[method-assign]
    VQAWorkerPodOperator._read_pod_container_states = lambda self, pod, *, reraise=True: None  # type: ignore[method-assign]
    VQAWorkerPodOperator.is_istio_enabled = lambda self, pod: False  # type: ignore[method-assign]
