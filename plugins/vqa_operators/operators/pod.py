"""``VQAWorkerPodOperator``: the same worker command in a pod (``VQA_EXECUTION=kubernetes``).

Everything the pod carries is derived when the pod is built, from the task's rendered spec and the
deployment's settings, never at DAG parse time: an empty rendered value is "not given", and no
value is rendered twice. The model endpoint decides the topology:

- a model service (the ``vqa_vlm`` connection's host, or the run's own model server): a CPU pod,
  sized for its task's work, with no GPU, GPU node selector or GPU toleration;
- none: vLLM is started inside the pod by the worker (``--serve-vllm``), health-checked before the
  first row, with the deployment's vLLM settings: a GPU pod on a GPU node.

Every worker setting of the deployment (``settings.worker_env``) reaches the pod as a literal;
secrets come from Kubernetes Secrets by reference, so no secret value is ever written into the pod
spec. S3's endpoint and region come from the ``aws_default`` connection; its credentials from the
``vqa-s3`` Secret (or the pod's service account: IRSA, workload identity).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
from collections.abc import Sequence
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from kubernetes.client import models as k8s

from vqa_operators import settings
from vqa_operators.operators.containers import NEVER_STARTS, Workload, locked_down, pod_security, waiting_in
from vqa_operators.operators.failures import final_error_for_exit_code
from vqa_operators.operators.model_server import RUN_SERVER_URL, run_server_url
from vqa_operators.operators.placement import PodSettings
from vqa_operators.operators.spec import WorkerSpec, task_timeout

__all__ = ["WORKER_COMMAND", "XCOM_FILE", "PodSettings", "VQAWorkerPodOperator", "worker_exit_code"]

XCOM_FILE = "/airflow/xcom/return.json"
WORKER_COMMAND = ["python3", "-m", "vqa_operators"]


def refuse_credentials_in(url: str | None, what: str) -> None:
    """A URL with ``user:password@`` would put a secret into the pod spec: refuse it, naming where the secret belongs."""
    from vqa_operators.exceptions import ConfigError

    if url and (urlsplit(url).password or urlsplit(url).username):
        raise ConfigError(
            f"{what} holds credentials (user:password@): a pod spec carries it in clear; put the key in the vqa_vlm "
            f"connection's password (the vqa-vlm Secret) instead"
        )


class VQAWorkerPodOperator(KubernetesPodOperator):
    """Run ``python -m vqa_operators run ...`` in a pod; the manifest comes back through the XCom sidecar."""

    # the spec is rendered like the pod operator's own fields; the pod's arguments are then made from it
    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "spec")

    def __init__(
        self,
        *,
        spec: WorkerSpec,
        shard: dict[str, Any] | None = None,
        pod: PodSettings | None = None,
        vlm_conn_id: str = "vqa_vlm",
        aws_conn_id: str | None = "aws_default",
        **kwargs: Any,
    ) -> None:
        placement = pod or PodSettings()
        kwargs.setdefault("name", f"vqa-{spec.generator.replace('_', '-')}")
        if placement.deferrable is not None:  # else the pod operator's default: the deployment's default_deferrable
            kwargs["deferrable"] = placement.deferrable
        super().__init__(
            image=placement.image,
            namespace=placement.namespace,
            cmds=list(WORKER_COMMAND),
            service_account_name=placement.service_account_name,
            # the worker never calls the Kubernetes API
            automount_service_account_token=False,
            security_context=pod_security(placement),
            container_security_context=locked_down(),
            # the XCom sidecar too: a namespace under the "restricted" Pod Security Standard admits no container without it
            xcom_sidecar_container_security_context=locked_down(),
            # the worker's last log lines (its one-line reason) become the pod's termination message
            termination_message_policy="FallbackToLogsOnError",
            # by topology when the pod is built (placement.timeouts)
            schedule_timeout_seconds=placement.schedule_timeout_seconds,
            startup_timeout_seconds=placement.startup_timeout_seconds,
            termination_grace_period=placement.termination_grace_period,
            poll_interval=placement.poll_interval,
            priority_class_name=placement.priority_class_name,
            do_xcom_push=True,
            # the log is followed into the task's log as the pod runs: a failed pod has nothing more to give once it ended
            get_logs=True,
            on_finish_action="delete_succeeded_pod" if placement.keep_failed_pods else "delete_pod",
            **kwargs,
        )
        # Airflow renders template fields in place, and mapped instances share partial()'s spec
        self.spec = copy.deepcopy(spec)
        # the run's own model server (VQA_MODEL_SERVER=run): its URL comes from the setup task, or the task fails
        self.calls_run_server = spec.get("base_url") == RUN_SERVER_URL
        self.shard = shard
        self.placement = placement
        self.vlm_conn_id = vlm_conn_id
        self.aws_conn_id = aws_conn_id

    def pre_execute(self, context: Any) -> None:
        """The pod's deadline and the task's time limit, from its shard's size (Airflow reads the limit after this, before ``execute``).

        The pod's ``activeDeadlineSeconds`` counts from its start; the task's limit adds the longest
        waits to be scheduled and to start, so the pod's deadline comes first and says why.
        """
        self.active_deadline_seconds = task_timeout(self.shard)
        if self.execution_timeout is None and self.active_deadline_seconds is not None:
            waits = max(sum(self.placement.timeouts(gpu=True)), sum(self.placement.timeouts(gpu=False)))
            self.execution_timeout = dt.timedelta(
                seconds=self.active_deadline_seconds + waits + self.placement.termination_grace_period
            )

    def execute(self, context: Any) -> Any:
        """The pod operator's run, with the job errors no retry can fix (a bad setting, say) failing the task at once."""
        from vqa_operators.operators.failures import fail_fast

        with fail_fast():
            return super().execute(context)

    def model_endpoint(self) -> Any:
        """The model server the worker calls: the run's own (the spec's base URL), else the ``vqa_vlm`` connection's (or none)."""
        from vqa_operators.hooks.vlm import VLMEndpoint, VLMHook

        endpoint = VLMHook(self.vlm_conn_id).get_endpoint()
        base_url = self.spec.get("base_url")
        if self.calls_run_server:
            run_server_url(base_url)
        # the run's own server serves the model the connection names (or VQA_MODEL), as the setup task chose it
        return VLMEndpoint(base_url=base_url, model=endpoint.model) if base_url else endpoint

    def s3_location(self) -> dict[str, str]:
        """``AWS_ENDPOINT_URL_S3`` and ``AWS_DEFAULT_REGION`` from the AWS connection, if it names them (never its credentials)."""
        if self.aws_conn_id is None:
            return {}
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            config = S3Hook(aws_conn_id=self.aws_conn_id).conn_config
        except AirflowNotFoundException:
            return {}
        refuse_credentials_in(config.endpoint_url, f"the {self.aws_conn_id} connection's endpoint_url")
        found = {"AWS_ENDPOINT_URL_S3": config.endpoint_url, "AWS_DEFAULT_REGION": config.region_name}
        return {name: value for name, value in found.items() if value}

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """The pod, from the rendered spec: its arguments, environment, Secrets, size and placement for the topology."""
        endpoint = self.model_endpoint()
        refuse_credentials_in(endpoint.base_url, "the model server's URL")
        serves_model = self.loads_model(endpoint)
        placement, generator = self.placement, self.spec.generator
        env = {
            **settings.worker_env(),
            **self.s3_location(),
            **({"VQA_BASE_URL": endpoint.base_url} if endpoint.base_url else {}),
            # the default model; a --model rendered from the run's params wins
            **({"VQA_MODEL": endpoint.model} if endpoint.model else {}),
        }
        # params, shard and settings reach the worker as typed: escaped for the kubelet's $(VAR) expansion (containers.Process);
        # a pod that only calls a model service needs no vLLM, torch or CUDA: the worker image; one that serves the model, vLLM's
        workload = Workload.of(
            placement,
            role=generator,
            loads_model=serves_model,
            command=WORKER_COMMAND,
            args=self.worker_args(context, serves_model),
            env=env,
        )
        self.cmds, self.arguments, self.env_vars = workload.process.command, workload.process.args, workload.process.env
        self.image, self.secrets, self.container_resources = workload.image, workload.secrets, workload.resources
        self.node_selector, self.tolerations = workload.node_selector, workload.tolerations
        self.schedule_timeout_seconds, self.startup_timeout_seconds = placement.timeouts(gpu=bool(workload.gpus))
        self.volumes, self.volume_mounts = workload.volumes, workload.mounts
        self.image_pull_secrets = workload.image_pull_secrets
        self.labels = dict(placement.labels)
        self.annotations = dict(placement.annotations)
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        # no service-link variables: a Service named vllm would give the worker VLLM_PORT=tcp://..., which vLLM refuses
        pod.spec.enable_service_links = False
        for container in pod.spec.containers:
            if (
                container.name == PodDefaults.SIDECAR_CONTAINER_NAME
            ):  # from the pod's own image (no Docker Hub pull), with limits a quota can count
                container.image = placement.xcom_sidecar_image or self.image
                container.resources = k8s.V1ResourceRequirements(**placement.xcom_sidecar_resources)
        return pod

    def loads_model(self, endpoint: Any) -> bool:
        """Whether the pod loads the model (vLLM in the pod, on its GPU): when no model service is configured."""
        return not endpoint.base_url

    def worker_args(self, context: Any, serves_model: bool) -> list[str]:
        """The worker's arguments: the rendered spec, checked as the worker will check it, the shard, where the manifest
        goes, and whether to start vLLM."""
        from vqa_operators.worker.options import argv, job_options

        values = {**self.spec.values(context), "shard": self.shard, "serve_vllm": serves_model}
        # the worker's own check, here first: a bad option fails the task, not the pod (the endpoint is the pod's)
        job_options(values)
        return [*argv(values), "--xcom-file", XCOM_FILE]

    @cached_property
    def pod_manager(self) -> Any:
        """The pod operator's pod manager, which gives up on a pod's start as soon as a container is known never to start."""
        return StartWatchingPodManager(kube_client=self.client, callbacks=self.callbacks)

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, xcom_result: dict | None = None, context: Any = None) -> None:
        """The pod operator's verdict, except that what no retry can fix fails the task at once, and an OOM kill says so.

        Both execution modes end here (the deferrable one through ``trigger_reentry``). The worker's
        exit codes map to the same errors as in-process (``failures``): configuration (2), unreadable
        input (3). A pod whose container could not be created (a missing Secret or key) is deleted, as
        it would wait for ever, and the task fails naming what is missing.
        """
        from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

        unstarted = None
        if remote_pod is not None and remote_pod.status is not None and remote_pod.status.phase == "Pending":
            with contextlib.suppress(Exception):  # the pod may be gone already
                unstarted = cannot_start(self.pod_manager.read_pod(remote_pod))
        try:
            super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except AirflowSkipException:
            raise
        except AirflowException as err:
            if unstarted is not None:
                self.pod_manager.delete_pod(remote_pod)
                raise AirflowFailException(
                    f"the pod {pod.metadata.name} could not start: {unstarted}; another try would fail the same way"
                ) from err
            code = worker_exit_code(remote_pod, self.base_container_name)
            final = final_error_for_exit_code(code)
            if final is not None:
                raise AirflowFailException(
                    f"the worker exited with code {code} ({final.__name__}): another try would fail the same way\n{err}"
                ) from err
            if terminated_reason(remote_pod, self.base_container_name) == "OOMKilled":
                limit = (self.container_resources.limits or {}).get("memory") if self.container_resources else None
                raise AirflowException(
                    f"the worker was killed for using more memory than its pod's limit ({limit}): OOMKilled. Raise this task's memory "
                    f"(Placement(tasks={{{self.task_id!r}: {{'memory': ...}}}}) in the DAG), or lower its concurrency\n{err}"
                ) from err
            raise


def cannot_start(remote_pod: k8s.V1Pod | None) -> str | None:
    """Why one of the pod's containers cannot start (its waiting reason and the kubelet's message), if it is one of ``NEVER_STARTS``."""
    status = waiting_in(remote_pod, NEVER_STARTS)
    return (
        f"container {status.name}: {status.state.waiting.reason}: {status.state.waiting.message}" if status is not None else None
    )


class StartWatchingPodManager(PodManager):
    """While it waits for a pod to start, a container that cannot start ends the wait at once (the pod operator's own waits
    only for image errors, so a missing Secret would hold the task for the whole startup timeout, on every try)."""

    _starting = False

    async def await_pod_start(self, pod: k8s.V1Pod, *args: Any, **kwargs: Any) -> None:
        self._starting = True
        try:
            await super().await_pod_start(pod, *args, **kwargs)
        finally:
            self._starting = False

    def read_pod(self, pod: k8s.V1Pod) -> k8s.V1Pod:
        from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchFailedException

        remote = super().read_pod(pod)
        if self._starting and (reason := cannot_start(remote)) is not None:
            raise PodLaunchFailedException(f"the pod {pod.metadata.name} cannot start: {reason}")
        return remote


def terminated(remote_pod: k8s.V1Pod | None, container: str) -> k8s.V1ContainerStateTerminated | None:
    """How the pod's ``container`` terminated, if it has."""
    from airflow.providers.cncf.kubernetes.utils.container import get_container_status

    status = get_container_status(remote_pod, container) if remote_pod is not None else None
    return status.state.terminated if status is not None and status.state else None


def terminated_reason(remote_pod: k8s.V1Pod | None, container: str) -> str | None:
    """Why the pod's worker container terminated (``OOMKilled``, ``Error``, ``Completed``), if it has."""
    state = terminated(remote_pod, container)
    return state.reason if state is not None else None


def worker_exit_code(remote_pod: k8s.V1Pod | None, container: str) -> int | None:
    """The exit code of the pod's worker container, if it has terminated."""
    state = terminated(remote_pod, container)
    return state.exit_code if state is not None else None
