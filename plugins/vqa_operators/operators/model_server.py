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
from vqa_operators.operators.placement import CONTAINER_ENV, PodSettings

SETUP_TASK = "model_server"
TEARDOWN_TASK = "stop_model_server"
# what a worker task of the run renders as its base URL (empty before the setup ran: plan checks the specs first)
RUN_SERVER_URL = "{{ (ti.xcom_pull(task_ids='" + SETUP_TASK + "') or {}).get('base_url', '') }}"


def run_server_url(spec_base_url: str | None) -> str:
    """A worker's rendered base URL when the run serves its own model: a ConfigError if the setup task said none."""
    from vqa_operators.exceptions import ConfigError

    if not spec_base_url:
        raise ConfigError(f"the run's model server gave no base_url: the {SETUP_TASK} task's XCom is missing (was it cleared without its setup?)")
    return spec_base_url
SERVER_PORT = 8000
SERVER_COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
APP_LABEL = "vqa-model-server"


def server_name(dag_id: str, run_id: str) -> str:
    """The run's server's Kubernetes name: stable across retries of the run, short and DNS-safe."""
    return "vqa-model-" + hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:12]


def server_manifests(
    *, name: str, namespace: str, model: str, placement: PodSettings, dag_id: str, run_id: str, max_num_seqs: int, vllm_args: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment and the Service of a run's model server: one vLLM pod on a GPU node, reached at ``http://<name>:8000``.

    The pod runs the worker image's vLLM as the image's own user, with the deployment's vLLM
    flags, the model cache and the Secrets by reference (the API key becomes vLLM's own, so the
    server refuses requests without it).
    """
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    from vqa_operators.operators.containers import Process, locked_down, secrets, volumes

    labels = {"app.kubernetes.io/name": APP_LABEL, "app.kubernetes.io/instance": name, **placement.labels}
    annotations = {"vqa/dag-id": dag_id, "vqa/run-id": run_id, **placement.annotations}
    size = placement.size("model_server", gpu=True)
    gpus = placement.gpu_count(serves_model=True)
    vols, mounts = volumes(placement, size.tmp)
    args = ["--model", model, "--host", "0.0.0.0", "--port", str(SERVER_PORT), "--max-num-seqs", str(max_num_seqs), *vllm_args]  # noqa: S104 - the Service reaches it
    # the model (a run's param) and the flags reach vLLM as typed: escaped for the kubelet's $(VAR) expansion (containers.Process)
    process = Process.of(SERVER_COMMAND, args, CONTAINER_ENV, placement.env)
    env = list(process.env)
    for secret in secrets(placement):
        if secret.deploy_target == settings.API_KEY_ENV:  # the server checks the key the workers send
            env.append(k8s.V1EnvVar(name="VLLM_API_KEY", value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=secret.secret, key=secret.key))))
        elif secret.deploy_target and secret.key:
            env.append(k8s.V1EnvVar(name=secret.deploy_target, value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=secret.secret, key=secret.key))))
    container = k8s.V1Container(
        name="vllm",
        image=placement.vllm_image,
        command=process.command,
        args=process.args,
        ports=[k8s.V1ContainerPort(name="http", container_port=SERVER_PORT)],
        env=env,
        resources=k8s.V1ResourceRequirements(
            limits={"cpu": size.cpu, "memory": size.memory, **({placement.gpu_resource: str(gpus)} if gpus else {})},
            requests={"cpu": size.cpu, "memory": size.memory, "ephemeral-storage": size.tmp},
        ),
        readiness_probe=k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path="/health", port="http"), period_seconds=10, failure_threshold=3),
        volume_mounts=mounts,
        security_context=locked_down(),
    )
    pod = k8s.V1PodSpec(
        containers=[container],
        volumes=vols,
        node_selector={**(placement.gpu_node_selector if gpus else {}), **placement.node_selector} or None,
        tolerations=[k8s.V1Toleration(**t) for t in [*(placement.gpu_tolerations if gpus else []), *placement.tolerations]] or None,
        service_account_name=placement.service_account_name,
        automount_service_account_token=False,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=n) for n in placement.image_pull_secrets] or None,
        priority_class_name=placement.priority_class_name,
        termination_grace_period_seconds=placement.termination_grace_period,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=placement.run_as_user, run_as_group=placement.run_as_user, fs_group=placement.run_as_user,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    deployment = k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations),
        spec=k8s.V1DeploymentSpec(
            replicas=1,
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
        spec=k8s.V1ServiceSpec(selector={"app.kubernetes.io/instance": name}, ports=[k8s.V1ServicePort(name="http", port=SERVER_PORT, target_port="http")]),
    )
    client = ApiClient()
    return client.sanitize_for_serialization(deployment), client.sanitize_for_serialization(service)


class VQAModelServerOperator(BaseOperator):
    """Setup: start the run's model server and return where it is (``base_url``) and how to stop it."""

    template_fields: Sequence[str] = ("model",)
    ui_color = "#fde3e3"

    def __init__(
        self,
        *,
        model: str | None = None,
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

    def served_model(self) -> str:
        """The run's ``model`` param, else the vqa_vlm connection's ``extra.model``, else ``VQA_MODEL``."""
        from vqa_operators.exceptions import ConfigError
        from vqa_operators.hooks.vlm import VLMHook

        model = self.model or VLMHook(self.vlm_conn_id).get_endpoint().model or settings.environment().model
        if not model:
            raise ConfigError("the run's model server needs a model: give the model param, the vqa_vlm connection's extra.model, or VQA_MODEL")
        return model

    def execute(self, context: Any) -> dict[str, Any]:
        """Start the server, wait until it is healthy; a failure stops what it started."""
        from vqa_operators.operators.failures import fail_fast

        with fail_fast():
            model = self.served_model()
            mode = self.mode or settings.environment().execution
            if mode == "kubernetes":
                return self.start_deployment(context, model)
            return self.start_process(context, model)

    def start_process(self, context: Any, model: str) -> dict[str, Any]:
        """local mode: vLLM on this machine."""
        from vqa_operators.serving.vllm_server import start_server

        env = settings.environment()
        name = server_name(context["dag"].dag_id, context["run_id"])
        log_path = str(Path(tempfile.gettempdir()) / f"{name}.log")
        self.log.info("starting the run's model server (%s) on this machine; its log: %s", model, log_path)
        server = start_server(model, log_path=log_path, max_num_seqs=env.max_num_seqs, startup_timeout=self.startup_timeout)
        self.log.info("the run's model server is healthy at %s (pid %d)", server.base_url, server.pid)
        return {"mode": "local", "base_url": server.base_url, "model": model, "pid": server.pid, "started": server.started, "log": log_path}

    def start_deployment(self, context: Any, model: str) -> dict[str, Any]:
        """kubernetes mode: a Deployment and a Service; healthy when ``/health`` answers through the Service."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes.client import AppsV1Api, CoreV1Api
        from kubernetes.client.exceptions import ApiException

        from vqa_operators.serving.vllm_server import wait_healthy

        env = settings.environment()
        placement = self.pod or PodSettings()
        hook = KubernetesHook(conn_id=self.kubernetes_conn_id)
        namespace = placement.namespace or hook.get_namespace() or "default"
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        name = server_name(dag_id, run_id)
        deployment, service = server_manifests(
            name=name, namespace=namespace, model=model, placement=placement, dag_id=dag_id, run_id=run_id,
            max_num_seqs=env.max_num_seqs, vllm_args=shlex.split(env.vllm_args),
        )
        client = hook.get_conn()
        for create in (lambda: AppsV1Api(client).create_namespaced_deployment(namespace, deployment), lambda: CoreV1Api(client).create_namespaced_service(namespace, service)):
            try:
                create()
            except ApiException as err:
                if err.status != 409:  # a retry of this task finds what its first try created
                    raise
        base = f"http://{name}.{namespace}.svc:{SERVER_PORT}"
        self.log.info("the run's model server %s/%s (%s) is starting; waiting for %s/health", namespace, name, model, base)
        wait_healthy(f"{base}/health", self.startup_timeout, what=f"Deployment {namespace}/{name}")
        return {"mode": "kubernetes", "base_url": f"{base}/v1", "model": model, "name": name, "namespace": namespace}


class VQAStopModelServerOperator(BaseOperator):
    """Teardown: stop the server the setup task started (nothing if it started none); runs even when the run failed."""

    ui_color = "#fde3e3"

    def __init__(self, *, setup_task_id: str = SETUP_TASK, kubernetes_conn_id: str | None = "kubernetes_default", **kwargs: Any) -> None:
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
        from kubernetes.client.exceptions import ApiException

        client = KubernetesHook(conn_id=self.kubernetes_conn_id).get_conn()
        name, namespace = server["name"], server["namespace"]
        for delete in (lambda: CoreV1Api(client).delete_namespaced_service(name, namespace), lambda: AppsV1Api(client).delete_namespaced_deployment(name, namespace)):
            try:
                delete()
            except ApiException as err:
                if err.status != 404:
                    raise
        self.log.info("deleted the run's model server %s/%s", namespace, name)
