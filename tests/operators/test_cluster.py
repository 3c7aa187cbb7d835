"""The container tier's kubelet and scheduler rules (``testkit.cluster``), checked against Kubernetes' documented behaviour.

The service-link variables follow the documentation's example ("Service" → "Discovering
services" → "Environment variables"), the placement messages the scheduler's own wording, and the
label selectors the API's equality syntax. Podman itself is not needed here: ``prepare`` makes the
manifest podman plays.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit.cluster import Claim, Config, Node, Service, Unschedulable, matches, prepare, schedule, service_links, tolerates
from testkit.expansion import CreateContainerConfigError


def test_service_links_are_the_documented_variables() -> None:
    """The documentation's example: Service redis-primary, TCP port 6379, cluster IP 10.0.0.11."""
    assert service_links({"redis-primary": Service(host="10.0.0.11", ports={"": 6379})}) == {
        "REDIS_PRIMARY_SERVICE_HOST": "10.0.0.11",
        "REDIS_PRIMARY_SERVICE_PORT": "6379",
        "REDIS_PRIMARY_PORT": "tcp://10.0.0.11:6379",
        "REDIS_PRIMARY_PORT_6379_TCP": "tcp://10.0.0.11:6379",
        "REDIS_PRIMARY_PORT_6379_TCP_PROTO": "tcp",
        "REDIS_PRIMARY_PORT_6379_TCP_PORT": "6379",
        "REDIS_PRIMARY_PORT_6379_TCP_ADDR": "10.0.0.11",
    }
    # a named port adds {SVC}_SERVICE_PORT_{NAME}; the first port is the Service's port
    named = service_links({"vllm": Service(host="10.0.0.7", ports={"http": 8000, "metrics": 9090})})
    assert (
        named["VLLM_SERVICE_PORT_HTTP"] == "8000"
        and named["VLLM_SERVICE_PORT"] == "8000"
        and named["VLLM_PORT"] == "tcp://10.0.0.7:8000"
    )
    assert named["VLLM_PORT_9090_TCP_ADDR"] == "10.0.0.7"


def pod(**spec: object) -> dict:
    container = {"name": "base", "image": "i", "command": ["python3"], "args": ["$(VQA_API_KEY)", "$(VLLM_PORT)"]}
    return {"metadata": {"name": "p", "labels": {}}, "spec": {"containers": [container], **spec}}


def config(tmp_path: Path, **changes: object) -> Config:
    fields: dict = {
        "name": "vqa",
        "workdir": str(tmp_path),
        "podman_env": {},
        "secrets": {"vqa-vlm": {"api-key": "sk-1"}},
        "services": {"vllm": Service(host="10.0.0.7", ports={"http": 8000})},
    }
    return Config(**{**fields, **changes})


def test_the_kubelet_links_services_unless_the_pod_opts_out_and_expands_against_them(tmp_path: Path) -> None:
    secret_env = [{"name": "VQA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vqa-vlm", "key": "api-key"}}}]
    linked = pod()
    linked["spec"]["containers"][0]["env"] = secret_env
    played = prepare(linked, config(tmp_path), tmp_path / "a").manifest["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in played["env"]}
    # the Secret stays a reference (podman resolves it); the links are literal values, the API server's own Service too
    assert env["VQA_API_KEY"] == {"secretKeyRef": {"name": "vqa-vlm", "key": "api-key"}}
    assert env["VLLM_PORT"] == "tcp://10.0.0.7:8000" and env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert played["args"] == ["sk-1", "tcp://10.0.0.7:8000"]  # what the kubelet's expansion makes of them

    opted_out = pod(enableServiceLinks=False)
    opted_out["spec"]["containers"][0]["env"] = secret_env
    played = prepare(opted_out, config(tmp_path), tmp_path / "b").manifest["spec"]["containers"][0]
    names = {e["name"] for e in played["env"]}
    assert "VLLM_PORT" not in names and "KUBERNETES_SERVICE_HOST" in names and played["args"] == ["sk-1", "$(VLLM_PORT)"]


def test_a_missing_secret_is_create_container_config_error(tmp_path: Path) -> None:
    spec = pod()
    spec["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "vqa-s3"}}]
    with pytest.raises(CreateContainerConfigError, match='secret "vqa-s3" not found'):
        prepare(spec, config(tmp_path), tmp_path / "c")


def test_volumes_are_what_the_kubelet_makes_of_them(tmp_path: Path) -> None:
    spec = pod(
        securityContext={"fsGroup": 2000},
        volumes=[
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "cache", "persistentVolumeClaim": {"claimName": "c"}},
            {"name": "nfs", "persistentVolumeClaim": {"claimName": "n"}},
        ],
    )
    block, nfs = tmp_path / "block", tmp_path / "nfs"
    for folder in (block, nfs):
        folder.mkdir()
        (folder / "model.bin").write_bytes(b"x")
        folder.chmod(0o755)
    claims = {"c": Claim(path=str(block)), "n": Claim(path=str(nfs), supports_fs_group=False)}
    prepared = prepare(spec, config(tmp_path, claims=claims), tmp_path / "pod")
    tmp = tmp_path / "pod" / "volumes" / "tmp"
    # an emptyDir: a fresh folder any user of the pod may write, group-owned by the fsGroup, setgid
    assert tmp.stat().st_mode & 0o7777 == 0o2777 and tmp.stat().st_gid == 2000
    # a claim whose storage honours fsGroup is given to the group; one whose storage does not (NFS) stays as it is
    assert block.stat().st_gid == 2000 and block.stat().st_mode & 0o2070 == 0o2070 and (block / "model.bin").stat().st_gid == 2000
    assert nfs.stat().st_gid == 0 and nfs.stat().st_mode & 0o777 == 0o755
    assert [v["hostPath"]["path"] for v in prepared.manifest["spec"]["volumes"]] == [str(tmp), str(block), str(nfs)]


def test_a_claim_that_does_not_exist_leaves_the_pod_unschedulable(tmp_path: Path) -> None:
    spec = pod(volumes=[{"name": "cache", "persistentVolumeClaim": {"claimName": "vqa-model-cache"}}])
    with pytest.raises(Unschedulable, match='persistentvolumeclaim "vqa-model-cache" not found'):
        prepare(spec, config(tmp_path), tmp_path / "d")


GPU_NODE = Node(
    name="gpu-1",
    labels={"nvidia.com/gpu.present": "true"},
    taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    allocatable={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
)
CPU_NODE = Node(name="cpu-1", labels={}, allocatable={"cpu": "4", "memory": "16Gi"})


def with_resources(limits: dict, requests: dict | None = None, **spec: object) -> dict:
    return {"containers": [{"name": "base", "resources": {"limits": limits, "requests": requests or limits}}], **spec}


def test_the_scheduler_places_a_pod_by_selector_taints_and_requests() -> None:
    gpu_pod = with_resources(
        {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
        nodeSelector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    assert schedule(gpu_pod, [CPU_NODE, GPU_NODE]).name == "gpu-1"
    assert (
        schedule(with_resources({"cpu": "2", "memory": "4Gi"}), [GPU_NODE, CPU_NODE]).name == "cpu-1"
    )  # the GPU taint keeps it off
    # requests equal to limits that no node holds: 8 CPUs and 48Gi on a node of 8 vCPU / 32 GiB
    too_big = {**gpu_pod, **with_resources({"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"})}
    with pytest.raises(Unschedulable) as err:
        schedule(too_big, [CPU_NODE, GPU_NODE])
    message = str(err.value)
    assert message.startswith("0/2 nodes are available: ") and "1 Insufficient memory" in message
    assert "1 node(s) didn't match Pod's node affinity/selector" in message


def test_tolerations_and_label_selectors_follow_the_apis_rules() -> None:
    taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    assert tolerates([{"key": "nvidia.com/gpu", "operator": "Exists"}], taint)
    assert tolerates([{"operator": "Exists"}], taint)  # an empty key with Exists tolerates everything
    assert tolerates([{"key": "nvidia.com/gpu", "value": "present"}], taint)
    assert not tolerates([{"key": "nvidia.com/gpu", "value": "absent"}], taint)
    assert not tolerates([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}], taint)
    labels = {"dag_id": "image_qa", "task_id": "generate", "already_checked": "True"}
    assert matches(labels, "dag_id=image_qa,task_id=generate")
    assert not matches(labels, "dag_id=image_qa,already_checked!=True")
    assert (
        matches(labels, "dag_id==image_qa,!airflow-worker")
        and not matches(labels, "!task_id")
        and not matches(labels, "try_number")
    )
