"""One model server for a whole DAG run (``VQA_MODEL_SERVER=run``): a setup task starts it, a teardown task stops it.

Every shard and every stage of the run calls it, so the model loads once per run instead of once
per worker task (video_qa: ingest, initial, multiagent, final and quality, per shard). Airflow runs
the teardown even when the run fails, so the GPU is given back.

- **local** mode: a vLLM process on this machine (``serving.vllm_server.start_server``), in a
  session of its own, so it outlives the setup task; the teardown stops its process group.
- **kubernetes** mode: a Deployment (one GPU pod running vLLM from the worker image) and a
  Service in front of it; the setup waits until ``/health`` answers through the Service.

The setup's XCom says where the server is (``base_url``) and how to stop it; the worker tasks take
``base_url`` from it (``RUN_SERVER_URL``).
"""

from __future__ import annotations

import hashlib
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError
from vqa_operators.operators.placement import PodSettings

SETUP_TASK = "model_server"
TEARDOWN_TASK = "stop_model_server"
# what a worker task of the run renders as its base URL (empty before the setup ran: plan checks the specs first)
RUN_SERVER_URL = "{{ (ti.xcom_pull(task_ids='" + SETUP_TASK + "') or {}).get('base_url', '') }}"


def run_server_url(spec_base_url: str | None) -> str:
    """A worker's rendered base URL when the run serves its own model: a ConfigError if the setup task said none."""
    if not spec_base_url:
        raise ConfigError(
            f"the run's model server gave no base_url: the {SETUP_TASK} task's XCom is missing (was it cleared without its setup?)"
        )
    return spec_base_url


SERVER_PORT = 8000
SERVER_COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
APP_LABEL = "vqa-model-server"
# what says whose a server is: the janitor and a setup's retry trust nothing else
INSTALLATION = "vqa/installation"
DAG_ID = "vqa/dag-id"
RUN_ID = "vqa/run-id"
EXPIRES = "vqa/expires-at"
# how often a queued setup looks again for a free place among the installation's servers
QUEUE_POLL_S = 15.0


def server_name(installation: str, dag_id: str, run_id: str) -> str:
    """The run's server's Kubernetes name: stable across retries of the run, distinct between installations, short and DNS-safe."""
    return "vqa-model-" + hashlib.sha256(f"{installation}/{dag_id}/{run_id}".encode()).hexdigest()[:12]


def owner(installation: str, dag_id: str, run_id: str) -> dict[str, str]:
    """The annotations that say which installation's run a server belongs to."""
    return {INSTALLATION: installation, DAG_ID: dag_id, RUN_ID: run_id}


def installation_servers(installation: str) -> str:
    """The label selector of an installation's run servers."""
    return f"app.kubernetes.io/name={APP_LABEL},{INSTALLATION}={installation}"


def server_manifests(
    *,
    name: str,
    namespace: str,
    model: str,
    placement: PodSettings,
    installation: str,
    dag_id: str,
    run_id: str,
    max_num_seqs: int,
    expires_at: str,
    startup_timeout: float = 1800.0,
    vllm_args: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment and the Service of a run's model server: one vLLM pod on a GPU node, reached at ``http://<name>:8000``.

    The pod runs vLLM's image as the image's own user, with the deployment's vLLM flags, the model
    cache and the Secrets by reference (the API key becomes vLLM's own, so the server refuses
    requests without it). The Deployment starts with no replica: the setup gives it one when the
    installation's bound on servers allows (``VQA_MAX_RUN_SERVERS``). A startup probe gives the
    model ``startup_timeout`` to load; a liveness probe then restarts a wedged engine.
    ``expires_at`` (ISO 8601) is when the janitor deletes it, whatever its run's state.
    """
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    from vqa_operators.operators.containers import Workload

    labels = {
        "app.kubernetes.io/name": APP_LABEL,
        "app.kubernetes.io/instance": name,
        INSTALLATION: installation,
        **placement.labels,
    }
    annotations = {**owner(installation, dag_id, run_id), EXPIRES: expires_at, **placement.annotations}
    args = ["--model", model, "--host", "0.0.0.0", "--port", str(SERVER_PORT), "--max-num-seqs", str(max_num_seqs), *vllm_args]  # noqa: S104 - the Service reaches it
    # the model (a run's param) and the flags reach vLLM as typed: escaped for the kubelet's $(VAR) expansion (containers.Process)
    workload = Workload.of(placement, role="model_server", loads_model=True, command=SERVER_COMMAND, args=args, env={})
    env = []
    for secret in workload.secrets:
        if secret.deploy_target == settings.API_KEY_ENV:  # the server checks the key the workers send
            env.append(
                k8s.V1EnvVar(
                    name="VLLM_API_KEY",
                    value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=secret.secret, key=secret.key)),
                )
            )
        elif secret.deploy_target and secret.key:
            env.append(
                k8s.V1EnvVar(
                    name=secret.deploy_target,
                    value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=secret.secret, key=secret.key)),
                )
            )
    health = k8s.V1HTTPGetAction(path="/health", port="http")
    container = workload.container(
        "vllm",
        env=env,
        ports=[k8s.V1ContainerPort(name="http", container_port=SERVER_PORT)],
        # the model loads under the startup probe; then a server that stops answering is restarted, and one that is busy is
        # only taken out of the Service
        startup_probe=k8s.V1Probe(http_get=health, period_seconds=10, failure_threshold=max(1, int(startup_timeout // 10))),
        liveness_probe=k8s.V1Probe(http_get=health, period_seconds=30, timeout_seconds=10, failure_threshold=4),
        readiness_probe=k8s.V1Probe(http_get=health, period_seconds=10, failure_threshold=3),
    )
    pod = workload.pod_spec([container], placement)
    deployment = k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations),
        spec=k8s.V1DeploymentSpec(
            replicas=0,
            selector=k8s.V1LabelSelector(match_labels={"app.kubernetes.io/instance": name}),
            # one GPU: never a second pod beside the first during a rollout
            strategy=k8s.V1DeploymentStrategy(type="Recreate"),
            template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels, annotations=annotations), spec=pod),
        ),
    )
    service = k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations),
        spec=k8s.V1ServiceSpec(
            selector={"app.kubernetes.io/instance": name},
            ports=[k8s.V1ServicePort(name="http", port=SERVER_PORT, target_port="http")],
        ),
    )
    client = ApiClient()
    return client.sanitize_for_serialization(deployment), client.sanitize_for_serialization(service)


def why_not_serving(pods: list[Any], events: list[Any]) -> str | None:
    """Why the server's pod will not serve without a change to the cluster or the spec, from its status and events; None if it may.

    A container waiting in one of ``containers.NEVER_SERVES``, or a pod the scheduler cannot place,
    unless the cluster autoscaler said it is adding a node for it (``TriggeredScaleUp``).
    """
    from vqa_operators.operators.containers import NEVER_SERVES, waiting_in

    for pod in pods:
        status = waiting_in(pod, NEVER_SERVES)
        if status is not None:
            waiting = status.state.waiting
            return f"pod {pod.metadata.name}: container {status.name}: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
        for condition in (pod.status.conditions or []) if pod.status else []:
            if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
                scaling = any(e.reason == "TriggeredScaleUp" and e.involved_object.name == pod.metadata.name for e in events)
                if not scaling:
                    return f"pod {pod.metadata.name}: Unschedulable: {condition.message}"
    return None


def server_position(deployments: list[Any], name: str) -> int:
    """``name``'s place in the installation's queue of servers: oldest first (ties by name), so every setup counts the same way."""
    order = sorted(deployments, key=lambda d: (d.metadata.creation_timestamp, d.metadata.name))
    return [d.metadata.name for d in order].index(name)


class VQAModelServerOperator(BaseOperator):
    """Setup: start the run's model server and return where it is (``base_url``) and how to stop it."""

    ui_color = "#fde3e3"

    def __init__(
        self,
        *,
        model: Any = None,
        mode: str | None = None,
        pod: PodSettings | None = None,
        vlm_conn_id: str = "vqa_vlm",
        kubernetes_conn_id: str | None = "kubernetes_default",
        startup_timeout: float = 1800.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.mode = mode
        self.pod = pod
        self.vlm_conn_id = vlm_conn_id
        self.kubernetes_conn_id = kubernetes_conn_id
        self.startup_timeout = startup_timeout

    def served_model(self, params: dict[str, Any] | None = None) -> str:
        """The run's ``model`` param (``model``: a value, or ``FromParam``), else the vqa_vlm connection's ``extra.model``, else ``VQA_MODEL``."""
        from vqa_operators.hooks.vlm import VLMHook
        from vqa_operators.operators.spec import resolve

        model = (
            resolve(self.model, params or {}) or VLMHook(self.vlm_conn_id).get_endpoint().model or settings.environment().model
        )
        if not model:
            raise ConfigError(
                "the run's model server needs a model: give the model param, the vqa_vlm connection's extra.model, or VQA_MODEL"
            )
        return model

    def execute(self, context: Any) -> dict[str, Any]:
        """Start the server, wait until it is healthy; a failure stops what it started."""
        from vqa_operators.operators.failures import fail_fast

        with fail_fast():
            model = self.served_model(context.get("params"))
            mode = self.mode or settings.environment().execution
            if mode == "kubernetes":
                return self.start_deployment(context, model)
            return self.start_process(context, model)

    def start_process(self, context: Any, model: str) -> dict[str, Any]:
        """local mode: vLLM on this machine."""
        from vqa_operators.serving.vllm_server import start_server

        env = settings.environment()
        name = server_name(env.installation, context["dag"].dag_id, context["run_id"])
        log_path = str(Path(tempfile.gettempdir()) / f"{name}.log")
        self.log.info("starting the run's model server (%s) on this machine; its log: %s", model, log_path)
        server = start_server(model, log_path=log_path, max_num_seqs=env.max_num_seqs, startup_timeout=self.startup_timeout)
        self.log.info("the run's model server is healthy at %s (pid %d)", server.base_url, server.pid)
        return {
            "mode": "local",
            "base_url": server.base_url,
            "model": model,
            "pid": server.pid,
            "started": server.started,
            "log": log_path,
        }

    def start_deployment(self, context: Any, model: str) -> dict[str, Any]:
        """kubernetes mode: a Deployment and a Service; healthy when ``/health`` answers through the Service.

        Whatever this try created is deleted if the server does not get healthy. A Deployment of the
        same name is adopted only if its annotations say it is this installation's run (a retry);
        anything else is refused. The server waits, with no replica, until fewer than
        ``VQA_MAX_RUN_SERVERS`` of the installation's servers are ahead of it.
        """
        import datetime as dt

        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes.client import AppsV1Api, CoreV1Api

        from vqa_operators.serving.vllm_server import wait_healthy

        env = settings.environment()
        placement = self.pod or PodSettings()
        hook = KubernetesHook(conn_id=self.kubernetes_conn_id)
        namespace = placement.namespace or hook.get_namespace() or "default"
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        name = server_name(env.installation, dag_id, run_id)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=env.run_server_max_hours)
        deployment, service = server_manifests(
            name=name,
            namespace=namespace,
            model=model,
            placement=placement,
            installation=env.installation,
            dag_id=dag_id,
            run_id=run_id,
            max_num_seqs=env.max_num_seqs,
            expires_at=expires.isoformat(timespec="seconds"),
            startup_timeout=self.startup_timeout,
            vllm_args=shlex.split(env.vllm_args),
        )
        client = hook.get_conn()
        apps, core = AppsV1Api(client), CoreV1Api(client)
        mine = owner(env.installation, dag_id, run_id)
        try:
            self.create_or_adopt(
                lambda: apps.create_namespaced_deployment(namespace, deployment),
                lambda: apps.read_namespaced_deployment(name, namespace),
                mine,
            )
            self.create_or_adopt(
                lambda: core.create_namespaced_service(namespace, service),
                lambda: core.read_namespaced_service(name, namespace),
                mine,
            )
            self.wait_for_a_place(apps, namespace, name, env)
            base = self.service_url(name, namespace)
            self.log.info("the run's model server %s/%s (%s) is starting; waiting for %s/health", namespace, name, model, base)
            selector = f"app.kubernetes.io/instance={name}"
            wait_healthy(
                f"{base}/health",
                self.startup_timeout,
                what=f"Deployment {namespace}/{name}",
                cannot_serve=lambda: why_not_serving(
                    core.list_namespaced_pod(namespace, label_selector=selector).items,
                    core.list_namespaced_event(namespace, field_selector="involvedObject.kind=Pod").items,
                ),
            )
        except BaseException as err:
            if not isinstance(err, ServerNotOurs):
                delete_server(apps, core, name, namespace)
                self.log.info("deleted what this try created of the run's model server %s/%s", namespace, name)
            raise
        return {"mode": "kubernetes", "base_url": f"{base}/v1", "model": model, "name": name, "namespace": namespace}

    @staticmethod
    def service_url(name: str, namespace: str) -> str:
        """Where the workers (and this task) reach the server: its Service's cluster DNS name."""
        return f"http://{name}.{namespace}.svc:{SERVER_PORT}"

    def create_or_adopt(self, create: Any, read: Any, mine: dict[str, str]) -> None:
        """Create an object of the server; on 409, adopt the one there only if its annotations say it is this run's."""
        from kubernetes.client.exceptions import ApiException

        try:
            create()
        except ApiException as err:
            if err.status != 409:
                raise
            found = read()
            annotations = found.metadata.annotations or {}
            if {key: annotations.get(key) for key in mine} != mine:
                theirs = ", ".join(f"{key}={annotations.get(key)!r}" for key in mine)
                raise ServerNotOurs(
                    f"{found.kind or 'an object'} {found.metadata.name} exists and is not this run's ({theirs}): another Airflow installation "
                    "shares the namespace under the same VQA_INSTALLATION; give each installation its own"
                ) from None
            self.log.info(
                "adopted %s %s, which an earlier try of this run created", found.kind or "the object", found.metadata.name
            )

    def wait_for_a_place(self, apps: Any, namespace: str, name: str, env: settings.Environment) -> None:
        """Give the Deployment its replica once fewer than ``VQA_MAX_RUN_SERVERS`` of the installation's servers are ahead of it."""
        import time

        from vqa_operators.exceptions import ServerUnavailableError

        deadline = time.monotonic() + self.startup_timeout
        while env.max_run_servers:
            ahead = server_position(
                apps.list_namespaced_deployment(namespace, label_selector=installation_servers(env.installation)).items, name
            )
            if ahead < env.max_run_servers:
                break
            if time.monotonic() > deadline:
                raise ServerUnavailableError(
                    f"{ahead} servers of this installation are ahead of {name} (VQA_MAX_RUN_SERVERS={env.max_run_servers}) after {self.startup_timeout:.0f}s"
                )
            self.log.info(
                "%d of this installation's run servers are ahead of %s (VQA_MAX_RUN_SERVERS=%d): waiting",
                ahead,
                name,
                env.max_run_servers,
            )
            time.sleep(QUEUE_POLL_S)
        apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 1}})


class ServerNotOurs(ConfigError):
    """A server of the run's name exists and belongs to another installation or run: left alone, and no retry helps."""


def delete_server(apps: Any, core: Any, name: str, namespace: str) -> None:
    """Delete a server's Service and Deployment (already gone is fine)."""
    from kubernetes.client.exceptions import ApiException

    for delete in (
        lambda: core.delete_namespaced_service(name, namespace),
        lambda: apps.delete_namespaced_deployment(name, namespace),
    ):
        try:
            delete()
        except ApiException as err:
            if err.status != 404:
                raise


class VQAStopModelServerOperator(BaseOperator):
    """Teardown: stop the server the setup task started (nothing if it started none); runs even when the run failed."""

    ui_color = "#fde3e3"

    def __init__(
        self, *, setup_task_id: str = SETUP_TASK, kubernetes_conn_id: str | None = "kubernetes_default", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.setup_task_id = setup_task_id
        self.kubernetes_conn_id = kubernetes_conn_id

    def execute(self, context: Any) -> None:
        """Stop the process, or delete the Deployment and the Service."""
        server = context["ti"].xcom_pull(task_ids=self.setup_task_id)
        if not server:
            self.log.info("the setup task started no model server: nothing to stop")
            return
        if server["mode"] == "kubernetes":
            self.delete_deployment(server)
            return
        from vqa_operators.serving.vllm_server import RunningServer, stop_server

        stopped = stop_server(RunningServer(base_url=server["base_url"], pid=server["pid"], started=server["started"]))
        self.log.info("the run's model server (pid %d) %s", server["pid"], "stopped" if stopped else "had already stopped")

    def delete_deployment(self, server: dict[str, Any]) -> None:
        """Delete the run's Deployment and Service (already gone is fine)."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes.client import AppsV1Api, CoreV1Api

        client = KubernetesHook(conn_id=self.kubernetes_conn_id).get_conn()
        delete_server(AppsV1Api(client), CoreV1Api(client), server["name"], server["namespace"])
        self.log.info("deleted the run's model server %s/%s", server["namespace"], server["name"])


class VQAJanitorOperator(BaseOperator):
    """Delete this installation's run servers that no run needs: their run is no longer queued or running (it ended, or was
    deleted in the UI, so its teardown never ran), or they outlived ``VQA_RUN_SERVER_MAX_HOURS``. A live run's server is kept.

    Returns what it deleted and what it kept, with why.
    """

    ui_color = "#fde3e3"
    ACTIVE = ("queued", "running")

    def __init__(
        self, *, namespace: str | None = None, kubernetes_conn_id: str | None = "kubernetes_default", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id

    def execute(self, context: Any) -> dict[str, list[dict[str, str]]]:
        import datetime as dt

        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes.client import AppsV1Api, CoreV1Api

        env = settings.environment()
        hook = KubernetesHook(conn_id=self.kubernetes_conn_id)
        namespace = self.namespace or env.namespace or hook.get_namespace() or "default"
        client = hook.get_conn()
        apps, core = AppsV1Api(client), CoreV1Api(client)
        now = dt.datetime.now(dt.UTC)
        found: dict[str, list[dict[str, str]]] = {"deleted": [], "kept": []}
        for deployment in apps.list_namespaced_deployment(namespace, label_selector=installation_servers(env.installation)).items:
            name, annotations = deployment.metadata.name, deployment.metadata.annotations or {}
            dag_id, run_id, expires = annotations.get(DAG_ID), annotations.get(RUN_ID), annotations.get(EXPIRES)
            if annotations.get(INSTALLATION) != env.installation or not dag_id or not run_id or not expires:
                found["kept"].append({"name": name, "why": "its annotations do not name this installation's run"})
                continue
            if dt.datetime.fromisoformat(expires) <= now:
                why = f"it outlived VQA_RUN_SERVER_MAX_HOURS ({expires})"
            elif context["ti"].get_dr_count(dag_id=dag_id, run_ids=[run_id], states=list(self.ACTIVE)) == 0:
                why = f"its run {dag_id}/{run_id} is no longer queued or running"
            else:
                found["kept"].append({"name": name, "why": f"its run {dag_id}/{run_id} is live"})
                continue
            delete_server(apps, core, name, namespace)
            self.log.info("deleted the run server %s/%s: %s", namespace, name, why)
            found["deleted"].append({"name": name, "why": why})
        self.log.info("run servers: %d deleted, %d kept", len(found["deleted"]), len(found["kept"]))
        return found
