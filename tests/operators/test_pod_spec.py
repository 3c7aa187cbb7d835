"""Kubernetes mode: worker pods built without a cluster (from the rendered task, as Airflow builds them) and validated against the schema.

``tests/operators/test_pods_run.py`` runs such pods as their specs stand; this file checks what the specs say.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/vqa-pod-test")

from testkit.data import MODEL
from vqa_operators.generators import generator_class
from vqa_operators.video import ClipRules

SECRET_KEY = "sk-must-not-appear"


@pytest.fixture
def vlm_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_VQA_VLM",
        json.dumps(
            {"conn_type": "http", "host": "http://vqa-model.vqa.svc:8000/v1", "password": SECRET_KEY, "extra": {"model": MODEL}}
        ),
    )


RUN_ID = "manual__2026-11-21T00:00:00+00:00"
PARAMS = {
    "image_qa": {
        "input_uri": "s3://in/rows.jsonl",
        "output_prefix": "s3://out/prefix",
        "media_root": "s3://in/",
        "pairs_per_row": 4,
        "seed": 9,
        "concurrency": 32,
    },
    "video_qa": {
        "input_uri": "s3://in/videos.jsonl",
        "output_prefix": "s3://out/prefix",
        "media_root": "s3://in/",
        "seed": 9,
        "concurrency": 32,
        "max_frames": 12,
        "max_iterations": 2,
        "final_pairs": 8,
    },
}


SHARD = {
    "input": "s3://in/rows.jsonl",
    "index": 3,
    "first_line": 301,
    "rows": 100,
    "start": 20480,
    "end": 27000,
    "version": '"etag-1"',
}


def build_manifest(
    monkeypatch: pytest.MonkeyPatch,
    dag_id: str = "image_qa",
    task_id: str = "generate",
    *,
    params: dict[str, Any] | None = None,
    dag: Any = None,
    shard: dict[str, Any] | None = None,
) -> dict:
    """The pod of ``task_id``'s mapped instance for a shard, as the run's task renders and builds it (``params`` replace the test's)."""
    from airflow.dag_processing.dagbag import DagBag
    from kubernetes.client import ApiClient

    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    monkeypatch.setenv("VQA_WORKER_IMAGE", "registry.example/vqa-worker:1.0")
    dag = dag or DagBag(dag_folder=os.path.join(os.path.dirname(__file__), "..", "..", "dags")).dags[dag_id]
    shard = shard or SHARD
    task = dag.get_task(task_id).unmap({"shard": shard})  # the mapped task instance for the shard, as Airflow builds it
    context = {
        "params": {**dag.params.dump(), **(PARAMS[dag_id] if params is None else params)},
        "dag": dag,
        "task": task,
        "run_id": RUN_ID,
        "ti": SimpleNamespace(dag_id=dag_id, task_id=task_id, map_index=shard["index"], try_number=1),
    }
    task.render_template_fields(context)
    pod = task.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def env_of(manifest: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in manifest["spec"]["containers"][0]["env"]}


def test_a_pod_that_calls_a_model_service_is_a_cpu_pod(vlm_connection, monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate

    manifest = build_manifest(monkeypatch)
    kubernetes_validate.validate(manifest, "1.33", strict=True)
    container = manifest["spec"]["containers"][0]
    assert container["image"] == "registry.example/vqa-worker:1.0"
    assert container["command"] == ["python3", "-m", "vqa_operators"]
    args = container["args"]
    # one pod per shard: its own output key (the map index), and the byte range it reads
    # the first stage reads the shard's byte range of the file the plan split (named in the shard)
    assert args[:4] == ["run", "image_qa", "--output", f"s3://out/prefix/image_qa/{RUN_ID}/generate/shard-00003.jsonl"]
    assert "--input" not in args
    assert json.loads(args[args.index("--shard") + 1]) == SHARD
    assert args[args.index("--try-number") + 1] == "1"
    assert args[args.index("--param") : args.index("--param") + 2] == ["--param", "pairs_per_row=4"]
    assert "--serve-vllm" not in args  # an existing service URL is configured
    # no GPU, no GPU node, sized for its task
    assert container["resources"] == {
        "limits": {"cpu": "2", "memory": "4Gi"},
        "requests": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "16Gi"},
    }
    spec = manifest["spec"]
    assert not spec.get("nodeSelector") and not spec.get("tolerations")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and volumes["tmp"]["emptyDir"]["sizeLimit"] == "16Gi"
    # no model loads here: no model cache, so the pod never waits on its claim; the Hub's cache, if anything asks, under /tmp
    assert "model-cache" not in volumes and "/models" not in json.dumps(container["volumeMounts"])
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # no service links (a Service named vllm would give VLLM_PORT=tcp://...); the XCom sidecar from the pod's own image, with limits
    assert spec["enableServiceLinks"] is False
    sidecar = manifest["spec"]["containers"][1]
    assert sidecar["image"] == container["image"] and sidecar["resources"]["limits"] == {"cpu": "100m", "memory": "64Mi"}
    # a failed pod is deleted too, once its log is in the task's (it is followed as the pod runs)
    env = env_of(manifest)
    assert env["HF_HOME"] == "/tmp/.cache/huggingface"
    assert env["VQA_BASE_URL"] == "http://vqa-model.vqa.svc:8000/v1" and env["VQA_MODEL"] == MODEL
    assert env["VQA_API_KEY"]["secretKeyRef"] == {"name": "vqa-vlm", "key": "api-key"}
    assert container["envFrom"] == [{"secretRef": {"name": "vqa-s3"}}]
    assert SECRET_KEY not in json.dumps(manifest)


def test_without_a_service_url_vllm_runs_in_a_gpu_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate

    monkeypatch.delenv("AIRFLOW_CONN_VQA_VLM", raising=False)
    monkeypatch.delenv("VQA_BASE_URL", raising=False)
    monkeypatch.setenv("VQA_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    monkeypatch.setenv("VQA_VLLM_ARGS", "--max-model-len 32768 --limit-mm-per-prompt '{\"image\": 16}'")
    monkeypatch.setenv("VQA_MAX_NUM_SEQS", "64")
    manifest = build_manifest(monkeypatch, "video_qa", "ingest")
    kubernetes_validate.validate(manifest, "1.33", strict=True)
    container, spec = manifest["spec"]["containers"][0], manifest["spec"]
    assert "--serve-vllm" in container["args"]
    env = env_of(manifest)
    # the deployment's vLLM settings start the in-pod server: its flags for video, and the batch size the worker sizes for
    assert env["VQA_MODEL"] == "Qwen/Qwen2.5-VL-7B-Instruct" and env["VQA_MAX_NUM_SEQS"] == "64"
    assert env["VQA_VLLM_ARGS"] == "--max-model-len 32768 --limit-mm-per-prompt '{\"image\": 16}'"
    # requests below limits: an 8 vCPU / 32 GiB one-GPU node (g5.2xlarge, g2-standard-8) takes it beside its daemons
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "28Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == {
        "cpu": "4",
        "memory": "24Gi",
        "ephemeral-storage": "64Gi",
        "nvidia.com/gpu": "1",
    }  # the ingest copies videos to /tmp
    # a GPU node is found by the GPU request and the GPU taint's toleration: no GPU Feature Discovery label
    assert not spec.get("nodeSelector")
    assert spec["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    # vLLM loads the model here: the cache claim, at HF_HOME
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "vqa-model-cache" and env["HF_HOME"] == "/models"


def test_default_params_give_no_empty_argument_and_a_shard_is_never_rendered(
    vlm_connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DAGs' defaults (no concurrency, no model) are "not given", and the shard's JSON reaches the pod as data."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    dag = DagBag(dag_folder=os.path.join(os.path.dirname(__file__), "..", "..", "dags")).dags["image_qa"]
    shard = {**SHARD, "input": "s3://in/{{ 7 * 7 }}.jsonl"}  # a template in the input cannot pass plan; if it did, it stays text
    params = {"input_uri": "s3://in/rows.jsonl", "output_prefix": "s3://out/prefix", "media_root": "s3://in/"}
    manifest = build_manifest(monkeypatch, params=params, dag=dag, shard=shard)
    args = manifest["spec"]["containers"][0]["args"]
    assert "" not in args and "--concurrency" not in args and "--model" not in args
    assert json.loads(args[args.index("--shard") + 1])["input"] == "s3://in/{{ 7 * 7 }}.jsonl"


# the ingest's defaults, as the trigger form's params render them
CLIP = ClipRules()


@pytest.mark.parametrize(
    ("task_id", "generator", "source", "params", "max_tokens"),
    [
        (
            "ingest",
            "video_ingest",
            None,
            [
                f"frames_per_clip={CLIP.frames_per_clip}",
                f"scene_threshold={CLIP.scene_threshold}",
                f"min_clip_s={CLIP.min_clip_s}",
                f"max_clip_s={CLIP.max_clip_s}",
                f"clip_s={CLIP.clip_s}",
                "caption=true",
                "transcribe=auto",
            ],
            "1024",
        ),
        ("initial", "video_qa_initial", f"s3://out/prefix/video_qa/{RUN_ID}/ingest/shard-00003.jsonl", ["max_frames=12"], "4096"),
        (
            "multiagent",
            "video_qa_multiagent",
            f"s3://out/prefix/video_qa/{RUN_ID}/initial/shard-00003.jsonl",
            ["max_frames=12", "max_iterations=2"],
            "4096",
        ),
        ("final", "video_qa_final", f"s3://out/prefix/video_qa/{RUN_ID}/multiagent/shard-00003.jsonl", ["final_pairs=8"], "4096"),
        (
            "quality",
            "quality",
            f"s3://out/prefix/video_qa/{RUN_ID}/dedup/shard-00003.jsonl",
            ["source=video_qa_final", "blind_check=true"],
            "1024",
        ),
    ],
)
def test_video_qa_tasks_are_valid_pods_chained_through_s3(
    vlm_connection,
    monkeypatch: pytest.MonkeyPatch,
    task_id: str,
    generator: str,
    source: str | None,
    params: list[str],
    max_tokens: str,
) -> None:
    import kubernetes_validate

    manifest = build_manifest(monkeypatch, "video_qa", task_id)
    kubernetes_validate.validate(manifest, "1.33", strict=True)
    container = manifest["spec"]["containers"][0]
    args = container["args"]
    output = (
        f"s3://out/prefix/video_qa/{RUN_ID}/{task_id}/shard-00003.jsonl"  # a later stage reads the same shard's upstream output
    )
    assert args[: 6 if source else 4] == ["run", generator, *(["--input", source] if source else []), "--output", output]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--param"][: len(params)] == params
    # the completion token limit is the generator's own (the worker takes it from its declaration), so the pod need not carry it
    assert (
        args[args.index("--seed") + 1] == "9"
        and "--max-tokens" not in args
        and generator_class(generator).max_tokens == int(max_tokens)
    )
    # the stages may read the media the run staged (the ingest's frames) in the run's own folder
    assert args[args.index("--staging-root") + 1] == f"s3://out/prefix/video_qa/{RUN_ID}"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    # the ingest decodes video: more CPU and memory, and a /tmp for the videos it copies
    expected = ("4", "8Gi", "64Gi") if task_id == "ingest" else ("2", "4Gi", "16Gi")
    assert (
        container["resources"]["requests"]["cpu"],
        container["resources"]["requests"]["memory"],
        container["resources"]["requests"]["ephemeral-storage"],
    ) == expected
    assert manifest["metadata"]["labels"]["task_id"] == task_id
    assert SECRET_KEY not in json.dumps(manifest)


def test_pod_runs_locked_down_with_the_deployments_worker_settings(vlm_connection, monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators import settings

    deployment = {
        "VQA_ALLOWED_MEDIA_ROOTS": "s3://in/,s3://shared-media/frames",
        "VQA_ALLOWED_INPUT_ROOTS": "s3://in",
        "VQA_ALLOWED_OUTPUT_ROOTS": "s3://out",
        "VQA_MAX_NUM_SEQS": "48",
        "VQA_CONCURRENCY": "40",
        "VQA_TRANSCRIPTION_URL": "http://whisper.vqa.svc:8000/v1",
        "VQA_TRANSCRIPTION_MODEL": "openai/whisper-large-v3",
        "VQA_BACKEND": "openai",
    }
    airflow_only = {
        "VQA_SCHEDULE": "@hourly",
        "VQA_RETRY_DELAY_SECONDS": "5",
        "VQA_PREVIEW_LINK_SECONDS": "600",
        "VQA_DATA_ROOT": "s3://in-data",
    }
    for name, value in {**deployment, **airflow_only}.items():
        monkeypatch.setenv(name, value)
    manifest = build_manifest(monkeypatch)
    spec, container = manifest["spec"], manifest["spec"]["containers"][0]
    assert spec["securityContext"] == {
        "fsGroup": 2000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "runAsGroup": 2000,
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    # the read-only root filesystem leaves /tmp (checkpoint index, upload spool, caches) writable
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/dev/shm"}
    env = env_of(manifest)
    # every worker setting the deployment set reaches the pod; the Airflow-only ones do not
    assert {
        k: v for k, v in env.items() if k.startswith("VQA_") and k not in ("VQA_API_KEY", "VQA_BASE_URL", "VQA_MODEL")
    } == deployment
    assert set(settings.worker_settings()) >= {k.removeprefix("VQA_").lower() for k in deployment}
    args = container["args"]
    assert args[args.index("--task-key") + 1] == f"image_qa/generate/{RUN_ID}/3"
    assert args[args.index("--concurrency") + 1] == "32"  # the run's param wins over VQA_CONCURRENCY


def test_placement_per_dag_and_task_reaches_every_worker_task_quality_included(
    vlm_connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubernetes_validate
    from airflow.sdk import DAG

    from vqa_operators.operators import Placement, PodSettings, WorkerSpec, judge_and_merge, shard_plan, worker_task
    from vqa_operators.operators.dag_config import DAG_DEFAULTS, export_params, io_params, quality_params

    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    pods = Placement(
        default=PodSettings(
            s3_secret=None,
            service_account_name="vqa-worker",
            image_pull_secrets=["regcred"],
            labels={"team": "vision"},
            annotations={"cost-center": "ml-data"},
            priority_class_name="batch-low",
            env={"HF_HUB_OFFLINE": "1"},
            secret_env={"HF_TOKEN": {"secret": "hf-token", "key": "token"}},
            node_selector={"pool": "cpu-batch"},
        ),
        tasks={"generate": {"cpu": "6", "memory": "12Gi"}},
    )
    with DAG(
        "placed",
        params={**io_params("placed", rows_doc="x", final_task="generate"), **quality_params(), **export_params()},
        **DAG_DEFAULTS,
    ) as dag:
        plan = shard_plan()
        generate = worker_task(task_id="generate", shards=plan, pods=pods, spec=WorkerSpec(generator="image_qa"))
        judge_and_merge(plan, {"generate": generate}, source="image_qa", dataset="image_qa", pods=pods)
    params = {"input_uri": "s3://in/rows.jsonl", "output_prefix": "s3://out/prefix", "media_root": "s3://in/"}
    for task_id, cpu in (("generate", "6"), ("quality", "2")):
        manifest = build_manifest(monkeypatch, "placed", task_id, params=params, dag=dag)
        kubernetes_validate.validate(manifest, "1.33", strict=True)
        spec, container = manifest["spec"], manifest["spec"]["containers"][0]
        # IRSA: no S3 Secret, the service account instead; the quality pods are placed like the others
        assert not container.get("envFrom") and spec["serviceAccountName"] == "vqa-worker", task_id
        assert spec["imagePullSecrets"] == [{"name": "regcred"}] and spec["priorityClassName"] == "batch-low"
        assert manifest["metadata"]["labels"]["team"] == "vision" and manifest["metadata"]["annotations"] == {
            "cost-center": "ml-data"
        }
        assert spec["nodeSelector"] == {"pool": "cpu-batch"}
        env = env_of(manifest)
        assert env["HF_HUB_OFFLINE"] == "1" and env["HF_TOKEN"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert container["resources"]["requests"]["cpu"] == cpu


def test_a_model_url_with_credentials_never_reaches_a_pod_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.exceptions import ConfigError

    monkeypatch.setenv(
        "AIRFLOW_CONN_VQA_VLM",
        json.dumps({"conn_type": "http", "host": f"http://user:{SECRET_KEY}@vllm.vqa.svc:8000/v1", "extra": {"model": MODEL}}),
    )
    with pytest.raises(ConfigError, match=r"holds credentials \(user:password@\): a pod spec carries it in clear") as err:
        build_manifest(monkeypatch)
    assert SECRET_KEY not in str(err.value)


def test_pods_take_the_s3_endpoint_and_region_from_the_aws_connection_never_its_keys(
    vlm_connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "AKIA-in-airflow",
                "password": "aws-secret-in-airflow",
                "extra": {"endpoint_url": "http://minio.vqa.svc:9000", "region_name": "eu-west-1"},
            }
        ),
    )
    manifest = build_manifest(monkeypatch)
    env = env_of(manifest)
    assert (env["AWS_ENDPOINT_URL_S3"], env["AWS_DEFAULT_REGION"]) == ("http://minio.vqa.svc:9000", "eu-west-1")
    assert "aws-secret-in-airflow" not in json.dumps(manifest) and "AKIA-in-airflow" not in json.dumps(manifest)


def test_pods_stop_within_an_explicit_grace_period_and_report_the_workers_last_words(
    vlm_connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vqa_operators.settings import POD_GRACE_PERIOD_S

    manifest = build_manifest(monkeypatch)
    assert manifest["spec"]["terminationGracePeriodSeconds"] == POD_GRACE_PERIOD_S == 30
    # the worker's one-line reason (its last log line) is the pod's termination message
    assert manifest["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def _pod_operator(**pod: object):
    from vqa_operators.operators import WorkerSpec, worker_task
    from vqa_operators.operators.pod import PodSettings

    return worker_task(
        task_id="generate",
        spec=WorkerSpec(generator="image_qa", input="s3://in/rows.jsonl"),
        mode="kubernetes",
        pods=PodSettings(**pod),
    )


def test_deferrable_pods_wait_in_the_triggerer(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    # by default, the deployment's [operators] default_deferrable (as the pod operator read it; False here)
    deployment_default = inspect.signature(KubernetesPodOperator.__init__).parameters["deferrable"].default
    assert _pod_operator().deferrable is deployment_default is False
    assert _pod_operator(deferrable=False).deferrable is False
    op = _pod_operator(deferrable=True, poll_interval=120)
    assert op.deferrable is True and op.poll_interval == 120


def _finished_pod(exit_code: int):
    from kubernetes.client import models as k8s

    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, message="vqa_operators: ConfigError: ...")
    status = k8s.V1ContainerStatus(
        name="base", image="w", image_id="w", ready=False, restart_count=0, state=k8s.V1ContainerState(terminated=terminated)
    )
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="vqa-image-qa-x", namespace="vqa"),
        status=k8s.V1PodStatus(phase="Failed", container_statuses=[status]),
    )


@pytest.mark.parametrize(
    ("exit_code", "retried"),
    [(2, False), (3, False), (1, True), (4, True), (5, True), (143, True)],
    ids=["config", "input", "unexpected", "server-down", "storage", "preempted"],
)
def test_a_worker_exit_code_no_retry_can_fix_fails_the_task_without_retries(
    monkeypatch: pytest.MonkeyPatch, exit_code: int, retried: bool
) -> None:
    """The pod operator's own exit-code handling (cleanup, which the deferrable path reaches too), without a cluster."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    op = _pod_operator()
    # the cluster calls: deleting the pod, labelling it as checked, looking for an istio sidecar
    monkeypatch.setattr(op, "process_pod_deletion", lambda *a, **k: None)
    monkeypatch.setattr(op, "patch_already_checked", lambda *a, **k: None)
    monkeypatch.setattr(op, "is_istio_enabled", lambda *a, **k: False)
    pod = _finished_pod(exit_code)
    with pytest.raises(AirflowException) as failed:
        op.post_complete_action(pod=pod, remote_pod=pod, context=None, result=None)
    # AirflowFailException fails the task at once; any other AirflowException is retried
    assert isinstance(failed.value, AirflowFailException) is not retried
    if not retried:
        assert f"the worker exited with code {exit_code}" in str(failed.value) and "another try would fail the same way" in str(
            failed.value
        )


# what the namespace's Secrets hold, as the kubelet resolves them into the container's environment
NAMESPACE_SECRETS = {
    "vqa-vlm": {"api-key": SECRET_KEY},
    "vqa-s3": {"AWS_ACCESS_KEY_ID": "AKIA-must-not-appear", "AWS_SECRET_ACCESS_KEY": "s3-secret-must-not-appear"},
}


def as_the_kubelet_starts_it(container: dict) -> tuple[list[str], dict[str, str]]:
    """The process's argv and environment after the kubelet's ``$(VAR)`` expansion of the container as specified."""
    from testkit.expansion import command_and_args, environment

    env = environment(container, NAMESPACE_SECRETS, namespace="vqa")
    command, args = command_and_args(container, env)
    return [*command, *args], env


@pytest.mark.parametrize("secret_name", ["VQA_API_KEY", "AWS_SECRET_ACCESS_KEY"])
def test_params_reach_the_worker_as_typed_whatever_the_kubelet_expands(
    vlm_connection, monkeypatch: pytest.MonkeyPatch, secret_name: str
) -> None:
    """A trigger's ``$(VAR)`` is text: the worker gets it as typed, never the Secret's value it names (the kubelet's expansion applied)."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv(
        "VQA_VLLM_ARGS", "--served-model-name 'a$b'"
    )  # a deployment setting with a $ of its own reaches the pod as set
    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    dags = DagBag(dag_folder=os.path.join(os.path.dirname(__file__), "..", "..", "dags")).dags
    reference = f"$({secret_name})"
    typed = {
        "pers_qa": {
            "tag": reference,
            "model": reference,
            "output_prefix": f"s3://out/{reference}",
            "media_root": f"s3://in/{reference}/",
        },
        "image_qa": {"model": f"$${reference}", "output_prefix": "s3://out/prefix", "media_root": "s3://in/", "pairs_per_row": 2},
    }
    for dag_id, params in typed.items():
        manifest = build_manifest(
            monkeypatch, dag_id, params={"input_uri": "s3://in/rows.jsonl", "seed": 9, **params}, dag=dags[dag_id]
        )
        container = manifest["spec"]["containers"][0]
        argv, env = as_the_kubelet_starts_it(container)
        assert argv[:5] == ["python3", "-m", "vqa_operators", "run", dag_id]
        assert argv[argv.index("--model") + 1] == params["model"]
        assert argv[argv.index("--media-root") + 1] == params["media_root"]
        assert argv[argv.index("--output") + 1].startswith(f"{params['output_prefix']}/{dag_id}/{RUN_ID}/generate/")
        if dag_id == "pers_qa":
            assert argv[argv.index("--param") + 1] == f"tag={reference}"
        assert env["VQA_VLLM_ARGS"] == "--served-model-name 'a$b'"
        process = json.dumps(
            [argv, {k: v for k, v in env.items() if k not in ("VQA_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}]
        )
        assert not any(secret in process for values in NAMESPACE_SECRETS.values() for secret in values.values())


def test_env_written_in_the_dag_may_use_references_on_purpose(vlm_connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PodSettings.env`` is the DAG author's: passed as written, so the kubelet expands it; every other value is escaped."""
    authored = {"OPENAI_BASE_URL": "$(VQA_BASE_URL)", "S3_KEY_ID": "$(AWS_ACCESS_KEY_ID)", "LITERAL": "$$(VQA_MODEL)"}
    monkeypatch.setenv(
        "VQA_POD_DEFAULTS", json.dumps({"env": authored})
    )  # the admins' PodSettings.env default, read when the DAG is parsed
    manifest = build_manifest(monkeypatch, params={**PARAMS["image_qa"], "model": "$(VQA_BASE_URL)"})
    argv, env = as_the_kubelet_starts_it(manifest["spec"]["containers"][0])
    assert (
        env["OPENAI_BASE_URL"] == "http://vqa-model.vqa.svc:8000/v1"
        and env["S3_KEY_ID"] == "AKIA-must-not-appear"
        and env["LITERAL"] == "$(VQA_MODEL)"
    )
    assert argv[argv.index("--model") + 1] == "$(VQA_BASE_URL)"


def test_a_worker_task_is_bounded_in_time_by_its_shards_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's activeDeadlineSeconds and the task's execution_timeout, set when the task starts, from its shard's rows."""
    import datetime as dt

    from vqa_operators.operators import WorkerSpec
    from vqa_operators.operators.local import VQAWorkerOperator
    from vqa_operators.operators.pod import VQAWorkerPodOperator

    shard = {**SHARD, "rows": 1000}
    pod = VQAWorkerPodOperator(task_id="generate", spec=WorkerSpec(generator="image_qa"), shard=shard)
    pod.pre_execute({})
    assert pod.active_deadline_seconds == 3600 + 5 * 1000
    # the task's limit adds the longest waits to be placed and to start (a GPU pod's: 900 + 900) and the grace period: the pod's
    # deadline comes first, and says why
    assert pod.execution_timeout == dt.timedelta(seconds=3600 + 5000 + 1800 + 30)
    local = VQAWorkerOperator(task_id="generate", spec=WorkerSpec(generator="image_qa"), shard=shard)
    local.pre_execute({})
    assert local.execution_timeout == dt.timedelta(seconds=8600)
    # a DAG's own limit wins; the settings change the bound; 0 is none
    own = VQAWorkerOperator(
        task_id="generate", spec=WorkerSpec(generator="image_qa"), shard=shard, execution_timeout=dt.timedelta(minutes=5)
    )
    own.pre_execute({})
    assert own.execution_timeout == dt.timedelta(minutes=5)
    monkeypatch.setenv("VQA_TASK_TIMEOUT_SECONDS", "600")
    monkeypatch.setenv("VQA_TASK_SECONDS_PER_ROW", "0.5")
    local = VQAWorkerOperator(task_id="generate", spec=WorkerSpec(generator="image_qa"), shard=shard)
    local.pre_execute({})
    assert local.execution_timeout == dt.timedelta(seconds=1100)
    monkeypatch.setenv("VQA_TASK_TIMEOUT_SECONDS", "0")
    pod = VQAWorkerPodOperator(task_id="generate", spec=WorkerSpec(generator="image_qa"), shard=shard)
    pod.pre_execute({})
    assert pod.active_deadline_seconds is None and pod.execution_timeout is None


def test_the_deployments_pod_defaults_sit_under_every_dags_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from vqa_operators.operators.placement import Placement, PodSettings

    monkeypatch.setenv(
        "VQA_POD_DEFAULTS",
        json.dumps(
            {
                "s3_secret": None,
                "service_account_name": "vqa-worker",
                "image_pull_secrets": ["regcred"],
                "startup_timeout_seconds": 600,
                "xcom_sidecar_image": "registry.example/tools/busybox:1.37",
                "tolerations": [{"key": "team", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            }
        ),
    )
    default = PodSettings()
    assert (default.s3_secret, default.service_account_name, default.image_pull_secrets, default.startup_timeout_seconds) == (
        None,
        "vqa-worker",
        ["regcred"],
        600,
    )
    # a DAG file's settings win over the deployment's; the rest keep the deployment's
    placed = Placement(
        default=PodSettings(service_account_name="vision-team"), tasks={"generate": {"startup_timeout_seconds": 120}}
    )
    generate = placed.for_task("generate")
    assert (generate.service_account_name, generate.startup_timeout_seconds, generate.s3_secret) == ("vision-team", 120, None)
    monkeypatch.setenv("VQA_POD_DEFAULTS", json.dumps({"servce_account_name": "typo"}))
    with pytest.raises(ValidationError, match="VQA_POD_DEFAULTS sets 'servce_account_name', which is not a PodSettings field"):
        PodSettings()
    monkeypatch.setenv("VQA_POD_DEFAULTS", json.dumps({"image": "x"}))
    with pytest.raises(ValidationError, match="VQA_POD_DEFAULTS sets 'image': set VQA_WORKER_IMAGE instead"):
        PodSettings()
    monkeypatch.setenv("VQA_POD_DEFAULTS", "[1, 2]")
    with pytest.raises(ValidationError, match="VQA_POD_DEFAULTS must be a JSON object of PodSettings fields"):
        PodSettings()


def test_the_deployments_sidecar_image_and_resources_reach_the_pod(vlm_connection, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "VQA_POD_DEFAULTS",
        json.dumps(
            {
                "xcom_sidecar_image": "registry.example/tools/busybox:1.37",
                "xcom_sidecar_resources": {
                    "requests": {"cpu": "5m", "memory": "8Mi"},
                    "limits": {"cpu": "50m", "memory": "32Mi"},
                },
            }
        ),
    )
    manifest = build_manifest(monkeypatch)
    sidecar = manifest["spec"]["containers"][1]
    assert sidecar["image"] == "registry.example/tools/busybox:1.37" and sidecar["resources"]["limits"] == {
        "cpu": "50m",
        "memory": "32Mi",
    }


def test_plan_names_every_secret_and_key_the_pods_read_that_the_namespace_lacks() -> None:
    from vqa_operators.operators.containers import missing_secrets
    from vqa_operators.operators.placement import PodSettings

    namespace = {"vqa-vlm": {"token"}, "hf-token": {"token"}}  # the API key under another key; no vqa-s3
    placements = [
        PodSettings(),
        PodSettings(
            secret_env={"HF_TOKEN": {"secret": "hf-token", "key": "token"}, "WANDB_API_KEY": {"secret": "wandb", "key": "key"}}
        ),
    ]
    assert missing_secrets(namespace.get, placements) == [
        "Secret 'vqa-s3' (s3_secret) does not exist",
        "Secret 'vqa-vlm' has no key 'api-key' (api_key_secret)",
        "Secret 'wandb' (secret_env['WANDB_API_KEY']) does not exist",
    ]
    # IRSA and a key of its own name: nothing missing
    assert missing_secrets({"vqa-vlm": {"token"}}.get, [PodSettings(s3_secret=None, api_key_secret_key="token")]) == []
