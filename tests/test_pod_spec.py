"""Kubernetes mode: the worker pod is built without a cluster and validated against the Kubernetes schema."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/vqa-pod-test")

from testkit.data import MODEL
from vqa_operators.video import ClipRules

SECRET_KEY = "sk-must-not-appear"


@pytest.fixture
def vlm_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_VQA_VLM",
        json.dumps({"conn_type": "http", "host": "http://vllm.vqa.svc:8000/v1", "password": SECRET_KEY, "extra": {"model": MODEL}}),
    )


RUN_ID = "manual__2026-11-21T00:00:00+00:00"
PARAMS = {
    "image_qa": {"input_uri": "s3://in/rows.jsonl", "output_prefix": "s3://out/prefix", "media_root": "s3://in/", "pairs_per_row": 4, "seed": 9, "concurrency": 32},
    "video_qa": {
        "input_uri": "s3://in/videos.jsonl", "output_prefix": "s3://out/prefix", "media_root": "s3://in/", "seed": 9, "concurrency": 32,
        "max_frames": 12, "max_iterations": 2, "final_pairs": 8,
    },
}


SHARD = {"input": "s3://in/rows.jsonl", "index": 3, "first_line": 301, "rows": 100, "start": 20480, "end": 27000, "version": '"etag-1"'}


def build_manifest(monkeypatch: pytest.MonkeyPatch, dag_id: str = "image_qa", task_id: str = "generate") -> dict:
    from airflow.dag_processing.dagbag import DagBag
    from kubernetes.client import ApiClient

    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    monkeypatch.setenv("VQA_WORKER_IMAGE", "registry.example/vqa-worker:1.0")
    dag = DagBag(dag_folder=os.path.join(os.path.dirname(__file__), "..", "dags")).dags[dag_id]
    task = dag.get_task(task_id).unmap({"shard": SHARD})  # the mapped task instance for shard 3, as Airflow builds it
    context = {
        "params": {**dag.params.dump(), **PARAMS[dag_id]},
        "dag": dag,
        "task": task,
        "run_id": RUN_ID,
        "ti": SimpleNamespace(dag_id=dag_id, task_id=task_id, map_index=SHARD["index"], try_number=1),
    }
    task.render_template_fields(context)
    pod = task.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def test_pod_is_valid_and_runs_the_worker_on_a_gpu(vlm_connection, monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    spec = manifest["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "vqa-model-cache"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["VQA_BASE_URL"]["value"] == "http://vllm.vqa.svc:8000/v1"
    assert env["VQA_MODEL"]["value"] == MODEL
    assert env["VQA_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vqa-vlm", "key": "api-key"}
    assert container["envFrom"] == [{"secretRef": {"name": "vqa-s3"}}]
    assert SECRET_KEY not in json.dumps(manifest)


def test_without_a_service_url_vllm_runs_in_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate

    monkeypatch.delenv("AIRFLOW_CONN_VQA_VLM", raising=False)
    monkeypatch.delenv("VQA_BASE_URL", raising=False)
    monkeypatch.setenv("VQA_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    manifest = build_manifest(monkeypatch)
    kubernetes_validate.validate(manifest, "1.33", strict=True)
    container = manifest["spec"]["containers"][0]
    assert container["args"][-1] == "--serve-vllm"
    assert {e["name"]: e.get("value") for e in container["env"]}["VQA_MODEL"] == "Qwen/Qwen2.5-VL-7B-Instruct"


# the ingest's defaults, as the trigger form's params render them
CLIP = ClipRules()


@pytest.mark.parametrize(
    ("task_id", "generator", "source", "params", "max_tokens"),
    [
        (
            "ingest", "video_ingest", None,
            [f"frames_per_clip={CLIP.frames_per_clip}", f"scene_threshold={CLIP.scene_threshold}", f"min_clip_s={CLIP.min_clip_s}", f"max_clip_s={CLIP.max_clip_s}",
             f"clip_s={CLIP.clip_s}", "caption=True", "transcribe=auto"], "1024",
        ),
        ("initial", "video_qa_initial", f"s3://out/prefix/video_qa/{RUN_ID}/ingest/shard-00003.jsonl", ["max_frames=12"], "4096"),
        ("multiagent", "video_qa_multiagent", f"s3://out/prefix/video_qa/{RUN_ID}/initial/shard-00003.jsonl", ["max_frames=12", "max_iterations=2"], "4096"),
        ("final", "video_qa_final", f"s3://out/prefix/video_qa/{RUN_ID}/multiagent/shard-00003.jsonl", ["final_pairs=8"], "4096"),
    ],
)
def test_video_qa_tasks_are_valid_gpu_pods_chained_through_s3(
    vlm_connection, monkeypatch: pytest.MonkeyPatch, task_id: str, generator: str, source: str | None, params: list[str], max_tokens: str
) -> None:
    import kubernetes_validate

    manifest = build_manifest(monkeypatch, "video_qa", task_id)
    kubernetes_validate.validate(manifest, "1.33", strict=True)
    container = manifest["spec"]["containers"][0]
    args = container["args"]
    output = f"s3://out/prefix/video_qa/{RUN_ID}/{task_id}/shard-00003.jsonl"  # a later stage reads the same shard's upstream output
    assert args[:6 if source else 4] == ["run", generator, *(["--input", source] if source else []), "--output", output]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--param"] == params
    assert args[args.index("--seed") + 1] == "9" and args[args.index("--max-tokens") + 1] == max_tokens
    # the stages may read the media the run staged (the ingest's frames) in the run's own folder
    assert args[args.index("--staging-root") + 1] == f"s3://out/prefix/video_qa/{RUN_ID}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert manifest["metadata"]["labels"]["task_id"] == task_id
    assert SECRET_KEY not in json.dumps(manifest)


def test_pod_runs_locked_down_with_the_allowlist_and_its_checkpoint_identity(vlm_connection, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQA_ALLOWED_MEDIA_ROOTS", "s3://in/,s3://shared-media/frames")
    manifest = build_manifest(monkeypatch)
    spec, container = manifest["spec"], manifest["spec"]["containers"][0]
    assert spec["securityContext"] == {
        "fsGroup": 1000, "runAsGroup": 1000, "runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
    }
    # the read-only root filesystem leaves /tmp (checkpoint index, upload spool) and the caches writable
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/dev/shm", "/models"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VQA_ALLOWED_MEDIA_ROOTS"] == "s3://in/,s3://shared-media/frames"
    args = container["args"]
    assert args[args.index("--task-key") + 1] == f"image_qa/generate/{RUN_ID}/3"
    assert args[args.index("--concurrency") + 1] == "32"


def test_pods_stop_within_an_explicit_grace_period_and_report_the_workers_last_words(vlm_connection, monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.settings import POD_GRACE_PERIOD_S

    manifest = build_manifest(monkeypatch)
    assert manifest["spec"]["terminationGracePeriodSeconds"] == POD_GRACE_PERIOD_S == 30
    # the worker's one-line reason (its last log line) is the pod's termination message
    assert manifest["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def _pod_operator(**pod: object):
    from vqa_operators.operators import WorkerSpec, worker_task
    from vqa_operators.operators.pod import PodSettings

    return worker_task(task_id="generate", spec=WorkerSpec(generator="image_qa", input="s3://in/rows.jsonl"), mode="kubernetes", pod=PodSettings(**pod))


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
    status = k8s.V1ContainerStatus(name="base", image="w", image_id="w", ready=False, restart_count=0, state=k8s.V1ContainerState(terminated=terminated))
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="vqa-image-qa-x", namespace="vqa"), status=k8s.V1PodStatus(phase="Failed", container_statuses=[status]))


@pytest.mark.parametrize(
    ("exit_code", "retried"),
    [(2, False), (3, False), (1, True), (4, True), (5, True), (143, True)],
    ids=["config", "input", "unexpected", "server-down", "storage", "preempted"],
)
def test_a_worker_exit_code_no_retry_can_fix_fails_the_task_without_retries(monkeypatch: pytest.MonkeyPatch, exit_code: int, retried: bool) -> None:
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
        assert f"the worker exited with code {exit_code}" in str(failed.value) and "another try would fail the same way" in str(failed.value)
