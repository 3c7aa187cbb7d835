"""The kit's generated manifests: ``deploy/run-server.yaml`` and ``deploy/rbac.yaml``.

``run-server.yaml``: the run-scoped model server's Deployment and Service, what
``operators.model_server.server_manifests`` makes for an example run, so it cannot drift from the
code (``tests/deploy/test_deploy.py`` compares them).

``rbac.yaml``: what Airflow's components may do in the pods' namespace (``RULES``), bound to the
accounts the official chart gives a release: ``<release>-worker``, ``<release>-scheduler`` and
``<release>-triggerer``. ``RULES`` is what the operators call, no more: the container tier and the
run server's recorded API derive it from the calls they answer (``tests/operators/test_smoke.py``).

``.venv/bin/python scripts/deploy_kit.py`` rewrites both (for the release ``airflow``);
``.venv/bin/python scripts/deploy_kit.py rbac --release <name> [--airflow-namespace <ns>]`` prints the
RBAC for another release.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
KIT = ROOT / "deploy" / "run-server.yaml"
RBAC = ROOT / "deploy" / "rbac.yaml"
# (apiGroup, resource, verbs, resourceNames): what the pod operator (worker tasks, and the triggerer's wait for a deferred pod),
# plan's Secret check, the run server's setup and teardown, and the janitor ask of the API in the pods' namespace
RULES: list[tuple[str, str, list[str], list[str] | None]] = [
    ("", "pods", ["create", "get", "list", "patch", "delete"], None),
    ("", "pods/log", ["get"], None),
    # the XCom sidecar's read: an exec opened by a GET upgraded to a WebSocket, authorized as create from Kubernetes 1.31, get before
    ("", "pods/exec", ["create", "get"], None),
    # a pod's events into the task's log; the triggerer watches them
    ("", "events", ["list", "watch"], None),
    # plan checks that the Secrets the pods read exist (the kit's; add yours): get, by name only
    ("", "secrets", ["get"], ["vqa-vlm", "vqa-s3", "hf-token"]),
    ("", "services", ["create", "get", "delete"], None),
    ("apps", "deployments", ["create", "get", "list", "delete"], None),
    ("apps", "deployments/scale", ["patch"], None),
]
COMPONENTS = ("worker", "scheduler", "triggerer")
# the example the file shows: a scheduled video_qa run of a 7B model, with the deployment kit's settings
DAG_ID, RUN_ID, NAMESPACE, INSTALLATION = "video_qa", "scheduled__2026-01-05T00:00:00+00:00", "vqa", "airflow"
EXPIRES_AT = "2026-01-07T00:05:00+00:00"  # VQA_RUN_SERVER_MAX_HOURS (48) after the setup ran
MODEL, IMAGE, MAX_NUM_SEQS = "Qwen/Qwen2.5-VL-7B-Instruct", "registry.example.com/vqa-worker-vllm:0.26.0", 256
VLLM_ARGS = ["--max-model-len", "32768", "--limit-mm-per-prompt", '{"image": 16}']
HEADER = """# The run-scoped model server (VQA_MODEL_SERVER=run), as the setup task creates it for one DAG run (here a
# scheduled video_qa run), and the teardown task deletes it: one GPU pod running vLLM from the worker image,
# behind a Service the worker pods call. It starts with no replica; the setup gives it one when fewer than
# VQA_MAX_RUN_SERVERS of the installation's servers are ahead of it. Its annotations name its owner, which the
# vqa_janitor DAG and a retry of the setup trust. Reference only: the setup task builds these itself for each run.
# Written by scripts/deploy_kit.py from operators/model_server.py; do not edit by hand.
"""


def example_manifests() -> list[dict[str, Any]]:
    """The Deployment and the Service of the example run."""
    os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".artifacts" / "airflow-home"))
    from vqa_operators.operators.model_server import server_manifests, server_name
    from vqa_operators.operators.placement import PodSettings

    placement = PodSettings(vllm_image=IMAGE, namespace=NAMESPACE)
    deployment, service = server_manifests(
        name=server_name(INSTALLATION, DAG_ID, RUN_ID),
        namespace=NAMESPACE,
        model=MODEL,
        placement=placement,
        installation=INSTALLATION,
        dag_id=DAG_ID,
        run_id=RUN_ID,
        max_num_seqs=MAX_NUM_SEQS,
        expires_at=EXPIRES_AT,
        vllm_args=VLLM_ARGS,
    )
    return [deployment, service]


def render() -> str:
    """run-server.yaml's text."""
    import yaml

    return HEADER + yaml.safe_dump_all(example_manifests(), sort_keys=False, default_flow_style=False, width=120)


def render_rbac(release: str = "airflow", airflow_namespace: str = "airflow", namespace: str = "vqa") -> str:
    """rbac.yaml's text: the pods' account, the Role of ``RULES`` and its binding to the release's components."""
    import yaml

    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "vqa-worker", "namespace": namespace},
        "automountServiceAccountToken": False,
    }
    rules = [
        {"apiGroups": [group], "resources": [resource], **({"resourceNames": names} if names else {}), "verbs": verbs}
        for group, resource, verbs, names in RULES
    ]
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "vqa-pod-launcher", "namespace": namespace},
        "rules": rules,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "vqa-pod-launcher", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vqa-pod-launcher"},
        "subjects": [
            {"kind": "ServiceAccount", "name": f"{release}-{component}", "namespace": airflow_namespace}
            for component in COMPONENTS
        ],
    }
    header = (
        f"# What Airflow's components may do in the {namespace} namespace, for the chart's release {release!r} in {airflow_namespace!r}:\n"
        "# launch and watch worker pods (the workers and the scheduler run tasks, the triggerer waits for deferred pods), check\n"
        "# the Secrets the pods read, run and clean up the run-scoped model servers. Only what the operators call: the tests\n"
        "# derive it from the calls. vqa-worker is the pods' own account (PodSettings.service_account_name): no API access,\n"
        "# only what IRSA or workload identity annotations give it.\n"
        "# Written by scripts/deploy_kit.py; for another release: .venv/bin/python scripts/deploy_kit.py rbac --release <name>\n"
    )
    return header + yaml.safe_dump_all([account, role, binding], sort_keys=False, default_flow_style=False, width=120)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=["rbac"], help="print only the RBAC, for --release")
    parser.add_argument("--release", default="airflow", help="the Airflow chart's release name")
    parser.add_argument("--airflow-namespace", default="airflow", help="the namespace Airflow runs in")
    args = parser.parse_args()
    if args.what == "rbac":
        print(render_rbac(args.release, args.airflow_namespace), end="")
    else:
        KIT.write_text(render())
        RBAC.write_text(render_rbac())
        print(f"wrote {KIT} and {RBAC}")
