"""``deploy/run-server.yaml``: the run-scoped model server's Deployment and Service, as the setup task builds them for one run.

The kit's copy is what ``operators.model_server.server_manifests`` makes for an example run, so it
cannot drift from the code (``tests/test_deploy.py`` compares them). After changing that code:
``.venv/bin/python scripts/deploy_kit.py`` rewrites the file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
KIT = ROOT / "deploy" / "run-server.yaml"
# the example the file shows: a scheduled video_qa run of a 7B model, with the deployment kit's settings
DAG_ID, RUN_ID, NAMESPACE = "video_qa", "scheduled__2026-01-05T00:00:00+00:00", "vqa"
MODEL, IMAGE, MAX_NUM_SEQS = "Qwen/Qwen2.5-VL-7B-Instruct", "registry.example.com/vqa-worker-vllm:0.26.0", 256
VLLM_ARGS = ["--max-model-len", "32768", "--limit-mm-per-prompt", '{"image": 16}']
HEADER = """# The run-scoped model server (VQA_MODEL_SERVER=run), as the setup task creates it for one DAG run (here a
# scheduled video_qa run), and the teardown task deletes it: one GPU pod running vLLM from the worker image,
# behind a Service the worker pods call. Reference only: the setup task builds these itself for each run.
# Written by scripts/deploy_kit.py from operators/model_server.py; do not edit by hand.
"""


def example_manifests() -> list[dict[str, Any]]:
    """The Deployment and the Service of the example run."""
    os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".artifacts" / "airflow-home"))
    from vqa_operators.operators.model_server import server_manifests, server_name
    from vqa_operators.operators.placement import PodSettings

    placement = PodSettings(vllm_image=IMAGE, namespace=NAMESPACE)
    deployment, service = server_manifests(
        name=server_name(DAG_ID, RUN_ID), namespace=NAMESPACE, model=MODEL, placement=placement, dag_id=DAG_ID, run_id=RUN_ID,
        max_num_seqs=MAX_NUM_SEQS, vllm_args=VLLM_ARGS,
    )
    return [deployment, service]


def render() -> str:
    """The file's text."""
    import yaml

    return HEADER + yaml.safe_dump_all(example_manifests(), sort_keys=False, default_flow_style=False, width=120)


if __name__ == "__main__":
    KIT.write_text(render())
    print(f"wrote {KIT}")
