"""The run's own model server in kubernetes mode, against a recorded fake of the Kubernetes API (``testkit.kube_api``).

The pod tier plays pods, not Deployments or Services (podman has no controller and no cluster DNS),
so the setup, the teardown and the janitor talk to a fake that answers as the API server would:
schema-checked objects, 409 on a second create, 404 on a missing one, label selectors. A pod's
status and events are what a test says a cluster would report. Each test says what a GPU leak
would look like, and that it does not happen.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/vqa-run-server-test")

from testkit.kube_api import FakeApi

RUN = "scheduled__2026-01-05T00:00:00+00:00"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    """Every AppsV1Api and CoreV1Api the operators make answers from one fake namespace ``vqa``."""
    return fake_api(monkeypatch)


def fake_api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    import kubernetes.client
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    fake = FakeApi()
    monkeypatch.setattr(kubernetes.client, "AppsV1Api", lambda client=None: fake.apps)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda client=None: fake.core)
    monkeypatch.setattr(KubernetesHook, "get_conn", lambda self: None)
    monkeypatch.setattr(KubernetesHook, "get_namespace", lambda self: "vqa")
    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    monkeypatch.setenv("VQA_NAMESPACE", "vqa")
    monkeypatch.delenv("AIRFLOW_CONN_VQA_VLM", raising=False)
    monkeypatch.setenv("VQA_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    import importlib

    monkeypatch.setattr(importlib.import_module("vqa_operators.operators.model_server"), "QUEUE_POLL_S", 0.0)
    return fake


def context(run_id: str = RUN, dag_id: str = "video_qa", active: set[tuple[str, str]] | None = None) -> dict[str, Any]:
    """A task's context; ``active``: the (dag_id, run_id) of runs that are queued or running, as Airflow would count them."""
    runs = active or set()
    ti = SimpleNamespace(
        get_dr_count=lambda dag_id, run_ids, states: (
            sum((dag_id, r) in runs for r in run_ids) if set(states) >= {"queued", "running"} else 0
        )
    )
    return {"dag": SimpleNamespace(dag_id=dag_id), "run_id": run_id, "ti": ti}


def setup(startup_timeout: float = 30.0, url: str | None = None) -> Any:
    """The setup task; ``url``: where its Service answers (the cluster's DNS name otherwise, which does not resolve here)."""
    from vqa_operators.operators.model_server import VQAModelServerOperator

    operator = VQAModelServerOperator(task_id="model_server", startup_timeout=startup_timeout)
    if url is not None:
        operator.service_url = lambda name, namespace: url  # type: ignore[method-assign]
    return operator


def crash_looping(message: str) -> dict[str, Any]:
    return {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": "vllm",
                "ready": False,
                "restartCount": 3,
                "image": "i",
                "imageID": "",
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": message}},
            }
        ],
    }


def test_a_server_that_becomes_healthy_is_created_scaled_and_deleted_by_the_teardown(api: FakeApi) -> None:
    from testkit.openai_server import OpenAITestServer
    from vqa_operators.operators.model_server import VQAStopModelServerOperator

    double = OpenAITestServer().start()
    try:
        server = setup(url=double.base_url.removesuffix("/v1")).execute(context())
    finally:
        double.stop()
    name = server["name"]
    # created with no replica, then given one: nothing else of the installation's was ahead
    assert api.scaled == {name: 1} and set(api.deployments) == set(api.services) == {name}
    assert api.deployments[name]["metadata"]["annotations"]["vqa/run-id"] == RUN
    VQAStopModelServerOperator(task_id="stop_model_server").execute({"ti": SimpleNamespace(xcom_pull=lambda task_ids: server)})
    assert api.deployments == {} and api.services == {}


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (
            crash_looping("back-off 40s restarting failed container=vllm"),
            "CrashLoopBackOff: back-off 40s restarting failed container=vllm",
        ),
        (
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "vllm",
                        "ready": False,
                        "restartCount": 0,
                        "image": "i",
                        "imageID": "",
                        "state": {
                            "waiting": {
                                "reason": "ImagePullBackOff",
                                "message": 'Back-off pulling image "vqa-worker-vllm:latest"',
                            }
                        },
                    }
                ],
            },
            'ImagePullBackOff: Back-off pulling image "vqa-worker-vllm:latest"',
        ),
        (
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
            "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        ),
    ],
    ids=["crash-loop", "image", "unschedulable"],
)
def test_a_server_that_cannot_serve_fails_at_once_and_leaves_nothing(api: FakeApi, status: dict[str, Any], reason: str) -> None:
    """The health wait reads the pod's status: no 30-minute wait on a pod that will never serve, and no GPU held after."""
    from vqa_operators.exceptions import ServerUnavailableError
    from vqa_operators.operators.model_server import server_name

    name = server_name("airflow", "video_qa", RUN)
    api.pod_on_scale = status  # the pod appears once the Deployment has its replica
    # a startup timeout no test would wait for: the reason ends the wait on its first look
    with pytest.raises(
        ServerUnavailableError, match=f"model server cannot start: Deployment vqa/{name}: pod {name}-.*: .*{reason.split(':')[0]}"
    ) as err:
        setup(startup_timeout=3600).execute(context())
    assert reason in str(err.value)
    assert api.deployments == {} and api.services == {}, "what the failed start created is deleted"


def test_an_unschedulable_server_waits_while_the_autoscaler_adds_a_node(api: FakeApi) -> None:
    from vqa_operators.operators.model_server import why_not_serving

    api.pod_status(
        "vqa-model-x",
        {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}],
        },
    )
    pods = api.core.list_namespaced_pod("vqa").items
    assert "Unschedulable" in (why_not_serving(pods, []) or "")
    api.event(pods[0].metadata.name, "TriggeredScaleUp", "pod triggered scale-up: [{gpu-pool 0->1 (max: 4)}]")
    assert why_not_serving(pods, api.core.list_namespaced_event("vqa").items) is None


def test_a_retry_adopts_its_own_server_and_never_another_installations(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from vqa_operators.exceptions import ServerUnavailableError
    from vqa_operators.operators.model_server import server_manifests, server_name
    from vqa_operators.operators.placement import PodSettings

    name = server_name("airflow", "video_qa", RUN)
    # another installation's server under this run's name (two installations once both named "airflow", one since renamed)
    theirs, service = server_manifests(
        name=name,
        namespace="vqa",
        model="m",
        placement=PodSettings(namespace="vqa"),
        installation="airflow-eu",
        dag_id="video_qa",
        run_id=RUN,
        max_num_seqs=8,
        expires_at="2026-01-07T00:00:00+00:00",
    )
    api.apps.create_namespaced_deployment("vqa", theirs)
    api.core.create_namespaced_service("vqa", service)
    with pytest.raises(AirflowFailException, match=r"Deployment .* exists and is not this run's \(vqa/installation='airflow-eu'"):
        setup().execute(context())
    assert (
        set(api.deployments) == {name} and api.deployments[name]["metadata"]["annotations"]["vqa/installation"] == "airflow-eu"
    ), "left alone"
    assert api.scaled == {}
    api.deployments.clear()
    api.services.clear()
    # a retry of this run's setup finds what its first try created, and adopts it
    first, _ = server_manifests(
        name=name,
        namespace="vqa",
        model="m",
        placement=PodSettings(namespace="vqa"),
        installation="airflow",
        dag_id="video_qa",
        run_id=RUN,
        max_num_seqs=8,
        expires_at="2026-01-07T00:00:00+00:00",
    )
    api.apps.create_namespaced_deployment("vqa", first)
    with pytest.raises(
        ServerUnavailableError, match="not healthy after"
    ):  # nothing answers here: the wait itself is the test's subject
        setup(startup_timeout=0.5).execute(context())
    assert api.scaled == {name: 1} and ("apps", "deployments", "get") in api.calls
    assert api.deployments == {} and api.services == {}, "an adopted server that never got healthy is deleted too"


def test_servers_of_an_installation_queue_for_their_gpus(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """``VQA_MAX_RUN_SERVERS`` bounds the servers with a replica; a setup behind them waits its turn (oldest first)."""
    from vqa_operators.exceptions import ServerUnavailableError
    from vqa_operators.operators.model_server import VQAJanitorOperator, server_manifests, server_name
    from vqa_operators.operators.placement import PodSettings

    monkeypatch.setenv("VQA_MAX_RUN_SERVERS", "1")
    older = server_name("airflow", "image_qa", "manual__a")
    deployment, service = server_manifests(
        name=older,
        namespace="vqa",
        model="m",
        placement=PodSettings(namespace="vqa"),
        installation="airflow",
        dag_id="image_qa",
        run_id="manual__a",
        max_num_seqs=8,
        expires_at="2099-01-01T00:00:00+00:00",
    )
    api.apps.create_namespaced_deployment("vqa", deployment)
    api.core.create_namespaced_service("vqa", service)
    mine = server_name("airflow", "video_qa", RUN)
    with pytest.raises(
        ServerUnavailableError, match=f"1 servers of this installation are ahead of {mine} \\(VQA_MAX_RUN_SERVERS=1\\)"
    ):
        setup(startup_timeout=0.2).execute(context())
    assert mine not in api.scaled and set(api.deployments) == {older}, "the queued server held no GPU, and is gone"
    # the older run has ended (its teardown never ran): the janitor deletes its server, and the next setup gets its turn
    swept = VQAJanitorOperator(task_id="janitor").execute(context(active={("video_qa", RUN)}))
    assert [d["name"] for d in swept["deleted"]] == [older] and "is no longer queued or running" in swept["deleted"][0]["why"]
    with pytest.raises(ServerUnavailableError, match="not healthy after"):
        setup(startup_timeout=0.2).execute(context())
    assert api.scaled == {mine: 1}


def test_the_janitor_deletes_only_servers_no_live_run_needs(api: FakeApi) -> None:
    from vqa_operators.operators.model_server import VQAJanitorOperator, server_manifests, server_name
    from vqa_operators.operators.placement import PodSettings

    def put(installation: str, dag_id: str, run_id: str, expires_at: str) -> str:
        name = server_name(installation, dag_id, run_id)
        deployment, service = server_manifests(
            name=name,
            namespace="vqa",
            model="m",
            placement=PodSettings(namespace="vqa"),
            installation=installation,
            dag_id=dag_id,
            run_id=run_id,
            max_num_seqs=8,
            expires_at=expires_at,
        )
        api.apps.create_namespaced_deployment("vqa", deployment)
        api.core.create_namespaced_service("vqa", service)
        return name

    live = put("airflow", "video_qa", "manual__live", "2099-01-01T00:00:00+00:00")
    ended = put("airflow", "image_qa", "manual__ended", "2099-01-01T00:00:00+00:00")  # finished, or deleted in the UI
    expired = put("airflow", "pers_qa", "manual__stuck", "2000-01-01T00:00:00+00:00")  # its run still "running" after the bound
    other = put(
        "airflow-eu", "image_qa", "manual__ended", "2000-01-01T00:00:00+00:00"
    )  # another installation's: never ours to judge
    found = VQAJanitorOperator(task_id="janitor").execute(
        context(active={("video_qa", "manual__live"), ("pers_qa", "manual__stuck")})
    )
    assert {d["name"] for d in found["deleted"]} == {ended, expired}
    assert {d["name"] for d in found["kept"]} == {live}
    assert set(api.deployments) == set(api.services) == {live, other}


def test_the_janitor_dag_exists_only_where_run_servers_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from airflow.dag_processing.dagbag import DagBag

    dags = Path(__file__).resolve().parents[2] / "dags"
    monkeypatch.setenv("VQA_EXECUTION", "kubernetes")
    monkeypatch.setenv("VQA_MODEL_SERVER", "run")
    bag = DagBag(dag_folder=str(dags / "vqa_janitor.py"))
    assert not bag.import_errors and bag.dags["vqa_janitor"].get_task("delete_idle_run_servers")
    monkeypatch.setenv("VQA_MODEL_SERVER", "connection")
    assert "vqa_janitor" not in DagBag(dag_folder=str(dags / "vqa_janitor.py")).dags


def run_server_lifecycle(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str, str]]:
    """Every call a run server's life asks of the API, as the authorizer sees them: a setup that gets healthy, its teardown, a
    retry that adopts, a start that crash-loops, a setup that waits its turn, the janitor. For the RBAC derivation (test_smoke)."""
    from testkit.openai_server import OpenAITestServer
    from vqa_operators.exceptions import ServerUnavailableError
    from vqa_operators.operators.model_server import VQAJanitorOperator, VQAStopModelServerOperator

    api = fake_api(monkeypatch)
    monkeypatch.setenv("VQA_MAX_RUN_SERVERS", "1")
    double = OpenAITestServer().start()
    try:
        server = setup(url=double.base_url.removesuffix("/v1")).execute(context())
        VQAStopModelServerOperator(task_id="stop_model_server").execute(
            {"ti": SimpleNamespace(xcom_pull=lambda task_ids: server)}
        )
        first = setup(url=double.base_url.removesuffix("/v1")).execute(context("manual__first"))
        setup(url=double.base_url.removesuffix("/v1")).execute(context("manual__first"))  # a retry adopts
    finally:
        double.stop()
    api.pod_on_scale = crash_looping("back-off")
    with pytest.raises(ServerUnavailableError):  # queued behind manual__first
        setup(startup_timeout=0.2).execute(context("manual__queued"))
    VQAJanitorOperator(task_id="janitor").execute(context(active=set()))
    assert first["name"] not in api.deployments
    with pytest.raises(ServerUnavailableError, match="CrashLoopBackOff"):
        setup(startup_timeout=3600).execute(context("manual__crash"))
    return set(api.calls)


def test_the_role_grants_every_call_of_a_run_servers_life(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast half of the RBAC derivation (the pods' half needs the container tier: tests/operators/test_smoke.py)."""
    from scripts.deploy_kit import RULES

    granted = {(group, resource, verb) for group, resource, verbs, _ in RULES for verb in verbs}
    called = run_server_lifecycle(monkeypatch)
    assert called - granted == set()
    assert {
        ("apps", "deployments", "create"),
        ("apps", "deployments/scale", "patch"),
        ("", "services", "delete"),
        ("", "events", "list"),
    } <= called
