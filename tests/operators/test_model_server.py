"""One model server per DAG run (``VQA_MODEL_SERVER=run``): its setup and teardown tasks, locally and as Kubernetes manifests.

The local server here is the test double started as vLLM would be (it takes vLLM's flags);
``tests/serving/test_real_vllm.py`` runs a whole DAG on a run-scoped vLLM.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/vqa-model-server-test")

ROOT = Path(__file__).resolve().parents[2]
DOUBLE = f"{sys.executable} -m testkit.openai_server"


def context(run_id: str, pulled: Any = None) -> dict[str, Any]:
    return {"dag": SimpleNamespace(dag_id="video_qa"), "run_id": run_id, "ti": SimpleNamespace(xcom_pull=lambda task_ids: pulled)}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_local_run_server_starts_serves_every_task_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.operators.model_server import VQAModelServerOperator, VQAStopModelServerOperator

    monkeypatch.setenv("VQA_VLLM_COMMAND", DOUBLE)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("AIRFLOW_CONN_VQA_VLM", raising=False)
    monkeypatch.setenv("VQA_MODEL", "served-for-the-run")
    server = VQAModelServerOperator(task_id="model_server").execute(context("manual__a"))
    try:
        assert server["mode"] == "local" and server["model"] == "served-for-the-run" and alive(server["pid"])
        with urllib.request.urlopen(f"{server['base_url']}/models", timeout=5) as resp:
            assert [m["id"] for m in json.load(resp)["data"]] == ["served-for-the-run"]
        # the process outlives the task that started it: its own session
        assert os.getsid(server["pid"]) == server["pid"]
    finally:
        VQAStopModelServerOperator(task_id="stop_model_server").execute(context("manual__a", server))
    assert not alive(server["pid"])
    # a second teardown (a cleared task) finds nothing to stop; a setup that started nothing leaves nothing to stop
    VQAStopModelServerOperator(task_id="stop_model_server").execute(context("manual__a", server))
    VQAStopModelServerOperator(task_id="stop_model_server").execute(context("manual__a", None))


def test_a_server_that_never_gets_healthy_is_stopped_and_its_log_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vqa_operators.exceptions import ServerUnavailableError
    from vqa_operators.serving.vllm_server import start_server

    marker = tmp_path / "pid"
    script = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); print('loading weights ...', flush=True); time.sleep(60)"
    monkeypatch.setenv("VQA_VLLM_COMMAND", f"{sys.executable} -c {json.dumps(script)}")
    with pytest.raises(ServerUnavailableError, match=r"not healthy after 2s: .*\n.*server\.log ends:\nloading weights \.\.\."):
        start_server("m", log_path=str(tmp_path / "server.log"), startup_timeout=2)
    assert not alive(int(marker.read_text()))


def test_stopping_leaves_a_process_that_reused_the_pid_alone() -> None:
    from vqa_operators.serving.vllm_server import RunningServer, stop_server

    # this test's own pid, as if the server had gone and the pid been given to this process
    assert stop_server(RunningServer(base_url="http://127.0.0.1:1/v1", pid=os.getpid(), started=1)) is False


def test_a_setup_without_a_model_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from vqa_operators.operators.model_server import VQAModelServerOperator

    monkeypatch.delenv("AIRFLOW_CONN_VQA_VLM", raising=False)
    monkeypatch.delenv("VQA_MODEL", raising=False)
    with pytest.raises(AirflowFailException, match="the run's model server needs a model"):
        VQAModelServerOperator(task_id="model_server").execute(context("manual__b"))


def restricted(manifest: dict[str, Any]) -> list[str]:
    """What the "restricted" Pod Security Standard would refuse in a pod (or a pod template): none, for our pods."""
    spec = manifest["spec"].get("template", {}).get("spec") or manifest["spec"]
    pod = spec.get("securityContext") or {}
    problems = []
    if (pod.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile")
    for container in spec["containers"]:
        security = container.get("securityContext") or {}
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{container['name']}: allowPrivilegeEscalation")
        if (security.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"{container['name']}: capabilities")
        if not (security.get("runAsNonRoot") or pod.get("runAsNonRoot")):
            problems.append(f"{container['name']}: runAsNonRoot")
    allowed = {"name", "emptyDir", "persistentVolumeClaim", "secret", "configMap", "projected", "downwardAPI", "ephemeral", "csi"}
    problems += [f"volume {v['name']}" for v in spec.get("volumes") or [] if set(v) - allowed]
    return problems


def test_the_kubernetes_server_is_one_gpu_pod_behind_a_service(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate

    from vqa_operators.operators.model_server import server_manifests, server_name
    from vqa_operators.operators.placement import PodSettings

    run = "scheduled__2026-01-05T00:00:00+00:00"
    name = server_name("airflow", "video_qa", run)
    # stable across retries of a run; distinct between runs, and between installations that share a namespace
    assert name == server_name("airflow", "video_qa", run) != server_name("airflow", "video_qa", "manual__x")
    assert name != server_name("airflow-eu", "video_qa", run)
    placement = PodSettings(
        image="registry.example/vqa-worker:1", namespace="vqa", secret_env={"HF_TOKEN": {"secret": "hf-token", "key": "token"}}
    )
    deployment, service = server_manifests(
        name=name,
        namespace="vqa",
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        placement=placement,
        installation="airflow",
        dag_id="video_qa",
        run_id="r",
        max_num_seqs=128,
        expires_at="2026-01-07T00:00:00+00:00",
        vllm_args=["--max-model-len", "32768"],
    )
    for manifest in (deployment, service):
        kubernetes_validate.validate(manifest, "1.33", strict=True)
    assert restricted(deployment) == []
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert container["args"] == [
        "--model",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--max-num-seqs",
        "128",
        "--max-model-len",
        "32768",
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and not pod.get("nodeSelector")
    assert pod["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    # the model loads under the startup probe (30 min by default); then a wedged engine is restarted, a busy one only unready
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] == 1800
    assert pod["enableServiceLinks"] is False and pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert {v["name"]: v for v in pod["volumes"]}["model-cache"]["persistentVolumeClaim"] == {"claimName": "vqa-model-cache"}
    # whose it is: what the janitor and a retry of the setup trust
    assert deployment["metadata"]["annotations"] == {
        "vqa/installation": "airflow",
        "vqa/dag-id": "video_qa",
        "vqa/run-id": "r",
        "vqa/expires-at": "2026-01-07T00:00:00+00:00",
    }
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    # the server demands the key the workers send; the gated model's token reaches it by reference
    assert env["VLLM_API_KEY"]["secretKeyRef"] == {"name": "vqa-vlm", "key": "api-key"} and env["HF_TOKEN"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "token",
    }
    # no replica until the installation's bound on servers lets it have one (the setup scales it)
    assert deployment["spec"]["replicas"] == 0 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_worker_pods_are_restricted_and_so_is_their_xcom_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.operators.test_pod_spec import build_manifest

    monkeypatch.setenv(
        "AIRFLOW_CONN_VQA_VLM",
        json.dumps({"conn_type": "http", "host": "http://vqa-model.vqa.svc:8000/v1", "extra": {"model": "m"}}),
    )
    manifest = build_manifest(monkeypatch)
    assert [c["name"] for c in manifest["spec"]["containers"]] == ["base", "airflow-xcom-sidecar"]
    assert restricted(manifest) == []


@pytest.fixture
def run_scoped_dags(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("VQA_MODEL_SERVER", "run")
    return DagBag(dag_folder=str(ROOT / "dags")).dags


@pytest.mark.parametrize("dag_id", ["image_qa", "pers_qa", "video_qa"])
def test_a_run_scoped_server_goes_around_every_worker_task(run_scoped_dags: dict[str, Any], dag_id: str) -> None:
    from vqa_operators.operators.model_server import RUN_SERVER_URL

    dag = run_scoped_dags[dag_id]
    setup, teardown = dag.get_task("model_server"), dag.get_task("stop_model_server")
    assert setup.is_setup and teardown.is_teardown and setup.task_id in teardown.upstream_task_ids
    # a bad param fails plan before any GPU is spent
    assert setup.upstream_task_ids == {"plan"}
    workers = [t for t in dag.tasks if "spec" in (getattr(t, "partial_kwargs", None) or {})]
    stages = {
        "image_qa": {"generate", "quality"},
        "pers_qa": {"generate", "quality"},
        "video_qa": {"ingest", "initial", "multiagent", "final", "quality"},
    }[dag_id]
    assert {t.task_id for t in workers} == stages
    for worker in workers:
        assert "model_server" in worker.upstream_task_ids and "stop_model_server" in worker.downstream_task_ids
        assert worker.partial_kwargs["spec"].get("base_url") == RUN_SERVER_URL
    # the merge needs no model: the GPU is given back without waiting for it
    assert "stop_model_server" not in dag.get_task("merge").upstream_task_ids


def test_without_a_run_scoped_server_the_dags_have_no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.delenv("VQA_MODEL_SERVER", raising=False)
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["video_qa"]
    assert not {"model_server", "stop_model_server"} & set(dag.task_ids)
    assert all(
        t.partial_kwargs["spec"].get("base_url") is None
        for t in dag.tasks
        if "spec" in (getattr(t, "partial_kwargs", None) or {})
    )


def test_a_worker_pod_of_a_run_scoped_server_is_a_cpu_pod_that_calls_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.operators.test_pod_spec import PARAMS, RUN_ID, SHARD

    monkeypatch.setenv("VQA_MODEL_SERVER", "run")
    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    monkeypatch.delenv("AIRFLOW_CONN_VQA_VLM", raising=False)
    monkeypatch.setenv("VQA_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["video_qa"]
    task = dag.get_task("initial").unmap({"shard": SHARD})
    server = {
        "mode": "kubernetes",
        "base_url": "http://vqa-model-abc.vqa.svc:8000/v1",
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "name": "vqa-model-abc",
        "namespace": "vqa",
    }
    ti = SimpleNamespace(
        dag_id="video_qa",
        task_id="initial",
        map_index=3,
        try_number=1,
        xcom_pull=lambda task_ids: server if task_ids == "model_server" else None,
    )
    context = {"params": {**dag.params.dump(), **PARAMS["video_qa"]}, "dag": dag, "task": task, "run_id": RUN_ID, "ti": ti}
    task.render_template_fields(context)
    from kubernetes.client import ApiClient

    manifest = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(context, dry_run=True))
    container = manifest["spec"]["containers"][0]
    assert (
        container["args"][container["args"].index("--base-url") + 1] == server["base_url"]
        and "--serve-vllm" not in container["args"]
    )
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and not manifest["spec"].get("nodeSelector")


def test_the_setup_gives_up_on_a_server_that_never_answers() -> None:
    """The health wait the kubernetes setup uses through the Service: a server that never answers is a clear error, not a hang."""
    from vqa_operators.exceptions import ServerUnavailableError
    from vqa_operators.serving.vllm_server import wait_healthy

    with pytest.raises(ServerUnavailableError, match="not healthy after 1s: Deployment vqa/x"):
        wait_healthy("http://127.0.0.1:9/health", 1.0, what="Deployment vqa/x")


def test_the_run_servers_model_and_flags_reach_vllm_as_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's ``model`` param is text to the server's container too: the kubelet's expansion gives back what was typed."""
    from tests.operators.test_pod_spec import NAMESPACE_SECRETS, SECRET_KEY, as_the_kubelet_starts_it
    from vqa_operators.operators.model_server import server_manifests
    from vqa_operators.operators.placement import PodSettings

    placement = PodSettings(image="registry.example/vqa-worker:1", namespace="vqa", env={"HOST_COPY": "$(HOME)"})
    deployment, _ = server_manifests(
        name="vqa-model-x",
        namespace="vqa",
        model="$(VLLM_API_KEY)",
        placement=placement,
        installation="airflow",
        dag_id="d",
        run_id="r",
        max_num_seqs=8,
        expires_at="2026-01-07T00:00:00+00:00",
        vllm_args=["--chat-template", "{{ x }}$$(HOME)"],
    )
    argv, env = as_the_kubelet_starts_it(deployment["spec"]["template"]["spec"]["containers"][0])
    assert argv[argv.index("--model") + 1] == "$(VLLM_API_KEY)" and argv[-1] == "{{ x }}$$(HOME)"
    assert env["VLLM_API_KEY"] == SECRET_KEY and env["HOST_COPY"] == "/tmp"  # the author's env may reference on purpose
    assert not any(value in " ".join(argv) for secret in NAMESPACE_SECRETS.values() for value in secret.values())
