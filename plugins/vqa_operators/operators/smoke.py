"""``vqa_smoke``'s operators: a pod per topology that checks what a worker needs of it, a sample for image_qa, and the report.

Kubernetes models are imported when a pod is built, not when the DAG is parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from vqa_operators.operators.pod import XCOM_FILE, VQAWorkerPodOperator
from vqa_operators.operators.spec import WorkerSpec, resolve

# the sample image_qa estimates on: rows of one small image each, written by the DAG's first task
SAMPLE_ROWS = 4
SAMPLE_FOLDER = "raw/vqa_smoke"
MODEL_CACHE = "/models"


class VQASmokePodOperator(VQAWorkerPodOperator):
    """A pod of one topology (``gpu``: the vLLM image on a GPU node with the model cache; else the worker image calling the model
    service), placed and locked down as the workers' pods are, running ``python -m vqa_operators smoke`` instead of a generator."""

    template_fields: Sequence[str] = (*VQAWorkerPodOperator.template_fields, "data_root")

    def __init__(self, *, gpu: bool, data_root: str, expect_gpu: Any = True, **kwargs: Any) -> None:
        super().__init__(spec=WorkerSpec(generator="smoke"), **kwargs)
        self.gpu = gpu
        self.data_root = data_root
        self.expect_gpu = expect_gpu

    def loads_model(self, endpoint: Any) -> bool:
        return self.gpu

    def worker_args(self, context: Any, serves_model: bool) -> list[str]:
        from vqa_operators.exceptions import ConfigError

        if not self.data_root:
            raise ConfigError("VQA_DATA_ROOT is not set: the smoke pods write their probe objects under the data's location")
        gpus = self.placement.gpu_count(serves_model=serves_model)
        expect = bool(resolve(self.expect_gpu, context.get("params") or {}))
        return [
            "smoke",
            "--data-root",
            self.data_root,
            "--name",
            self.task_id,
            "--uid",
            str(self.placement.run_as_user),
            *(["--model-cache", MODEL_CACHE] if serves_model else []),
            *(["--gpus", str(gpus)] if gpus else []),
            *(["--expect-gpu"] if expect else []),
            "--xcom-file",
            XCOM_FILE,
        ]


def sample_rows(folder: str) -> list[tuple[str, bytes]]:
    """The sample: ``SAMPLE_ROWS`` small PNG images of distinct colours and a JSONL row for each, as (uri, bytes) to write."""
    import io
    import json

    from PIL import Image, ImageDraw

    files, rows = [], []
    for index in range(SAMPLE_ROWS):
        image = Image.new("RGB", (96, 96), ((60 * index) % 256, 120, 255 - 50 * index))
        ImageDraw.Draw(image).rectangle((16 + 8 * index, 24, 72, 80), fill=(255, 255, 255))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uri = f"{folder}/images/{index}.png"
        files.append((uri, buffer.getvalue()))
        rows.append(json.dumps({"id": f"smoke-{index}", "image": [uri]}))
    files.append((f"{folder}/input.jsonl", ("\n".join(rows) + "\n").encode()))
    return files


class VQASmokeSampleOperator(BaseOperator):
    """Write the smoke's sample under the data root (the same bytes every time: a rerun rewrites the same objects)."""

    template_fields: Sequence[str] = ("folder",)

    def __init__(self, *, folder: str | None, aws_conn_id: str | None = "aws_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.folder = folder
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> str:
        from airflow.sdk.exceptions import AirflowFailException

        from vqa_operators.hooks.storage import s3_storage

        if not self.folder:
            raise AirflowFailException(
                "VQA_DATA_ROOT is not set: the smoke test writes its sample and probes under the data's location"
            )
        storage = s3_storage(self.aws_conn_id)
        files = sample_rows(self.folder.rstrip("/"))
        for uri, data in files:
            with storage.open_atomic(uri) as handle:
                handle.write(data)
        self.log.info("wrote the smoke's sample: %d rows at %s", SAMPLE_ROWS, files[-1][0])
        return files[-1][0]


class VQASmokeReportOperator(BaseOperator):
    """Print a verdict per check of every smoke pod, and the image_qa estimate's; fail if one failed or never ran."""

    def __init__(self, *, pods: Sequence[str], merge: str, **kwargs: Any) -> None:
        super().__init__(trigger_rule="all_done", **kwargs)
        self.pods = list(pods)
        self.merge = merge

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from vqa_operators.smoke import Verdict

        ti = context["ti"]
        lines, failed = [], []
        for task_id in self.pods:
            found = ti.xcom_pull(task_ids=task_id)
            if not found:
                failed.append(task_id)
                lines.append(f"FAIL {task_id}: no verdicts (the pod did not start or run: its task's log says why)")
                continue
            for verdict in map(Verdict.model_validate, found["checks"]):
                lines.append(verdict.line(task_id))
                if verdict.ok is False:
                    failed.append(f"{task_id} {verdict.check}")
        from vqa_operators.records import RunManifest

        merged = ti.xcom_pull(task_ids=self.merge)
        if merged:
            run = RunManifest.model_validate(merged)
            lines.append(
                f"PASS image_qa estimate: {run.rows_in} rows in, {run.rows_out} out, {run.rows_failed} failed, {run.pairs_kept} pairs kept; "
                f"{run.output}, preview {run.preview}"
            )
        else:
            failed.append("image_qa estimate")
            lines.append("FAIL image_qa estimate: the merge gave no manifest (see the failed task's log)")
        for line in lines:
            self.log.info("%s", line)
        if failed:
            raise AirflowFailException(f"the smoke test failed: {', '.join(failed)}")
        self.log.info("the smoke test passed: this cluster runs the DAGs")
        return {"lines": lines}
