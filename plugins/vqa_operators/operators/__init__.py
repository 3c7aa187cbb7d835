"""Airflow operators that wrap the worker, and the factory that picks local or Kubernetes execution.

``VQA_EXECUTION`` (environment variable, or Airflow Variable of that name) selects the mode:
``local`` (default) runs the worker inside the task process; ``kubernetes`` runs it in a GPU pod.
The pod operator is imported only in Kubernetes mode, to keep DAG parsing light.
"""

from __future__ import annotations

import os
from typing import Any

from vqa_operators.operators.local import VQAWorkerOperator
from vqa_operators.operators.spec import STAGED_OUTPUT_URI, WorkerSpec, staged_output

MODES = ("local", "kubernetes")

__all__ = ["MODES", "STAGED_OUTPUT_URI", "VQAWorkerOperator", "WorkerSpec", "execution_mode", "staged_output", "worker_task"]


def execution_mode() -> str:
    """``VQA_EXECUTION`` from the environment, else the Airflow Variable, else ``local``."""
    mode = os.environ.get("VQA_EXECUTION")
    if not mode:
        from airflow.sdk import Variable

        mode = Variable.get("VQA_EXECUTION", default="local")
    mode = mode.strip().lower()
    if mode not in MODES:
        raise ValueError(f"VQA_EXECUTION must be one of {MODES}, got {mode!r}")
    return mode


def worker_task(*, task_id: str, spec: WorkerSpec, mode: str | None = None, pod: Any = None, **kwargs: Any) -> Any:
    """The operator that runs ``spec``: in-process (local) or in a pod (kubernetes; ``pod`` is its PodSettings)."""
    mode = mode or execution_mode()
    if mode == "kubernetes":
        from vqa_operators.operators.pod import VQAWorkerPodOperator

        return VQAWorkerPodOperator(task_id=task_id, spec=spec, pod=pod, **kwargs)
    return VQAWorkerOperator(task_id=task_id, spec=spec, **kwargs)
