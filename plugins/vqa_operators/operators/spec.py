"""``WorkerSpec``: one description of a worker run, turned into CLI arguments (pods) or JobOptions (in-process).

Its field names are the worker's option names (``JobOptions`` and the CLI flags), so both
translations are mechanical.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from vqa_operators import settings


def staged_output(task_id: str = "{{ task.task_id }}") -> str:
    """Where a task of this DAG run stages its JSONL: ``<output_prefix>/<dag_id>/<run_id>/<task_id>.jsonl``.

    A mapped task instance (one shard) stages ``<task_id>/shard-<map index>.jsonl`` instead, and
    a mapped downstream task reads the upstream shard of its own map index. Staged outputs live
    under the run's identity, never the clock: a retry rewrites the same key, and a downstream
    task finds its input by the upstream task's id.
    """
    shard = "{{ '/shard-%05d' % ti.map_index if ti.map_index is not none and ti.map_index >= 0 else '' }}"
    return "{{ params.output_prefix.rstrip('/') }}/{{ dag.dag_id }}/{{ run_id }}/" + task_id + shard + ".jsonl"


STAGED_OUTPUT_URI = staged_output()
# the run's staging folder: media an earlier task of the run wrote there (the video ingest's frames) may be read
STAGING_ROOT = "{{ params.output_prefix.rstrip('/') }}/{{ dag.dag_id }}/{{ run_id }}"
# the task's identity, which names its checkpoint: every try of one task instance shares it
TASK_KEY = "{{ dag.dag_id }}/{{ task.task_id }}/{{ run_id }}/{{ ti.map_index }}"
TRY_NUMBER = "{{ ti.try_number }}"


def task_timeout(shard: dict[str, Any] | None) -> int | None:
    """Seconds a worker task over ``shard`` may run (``VQA_TASK_TIMEOUT_SECONDS`` and ``VQA_TASK_SECONDS_PER_ROW``; None: unbounded)."""
    rows = shard.get("rows") if shard else None
    return settings.environment().task_timeout(int(rows) if rows is not None else None)


@dataclass
class WorkerSpec:
    """The worker's arguments; string fields may hold Jinja templates that Airflow renders."""

    # Airflow renders the template fields of objects held in an operator's template fields
    template_fields: ClassVar[tuple[str, ...]] = (
        "input", "output", "errors", "base_url", "model", "params", "concurrency", "seed", "media_root", "staging_root", "task_key", "try_number",
    )

    generator: str
    # None: the file the plan task split (the shard's input), with the run's dates filled in
    input: str | None = None
    output: str = STAGED_OUTPUT_URI
    errors: str | None = None
    # None: the vqa_vlm connection's host; the run's own model server (VQA_MODEL_SERVER=run) sets it
    base_url: str | None = None
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    concurrency: int | str | None = None  # None: derived from the server's max_num_seqs
    seed: int | str | None = None
    temperature: float = settings.TEMPERATURE
    top_p: float = settings.TOP_P
    max_tokens: int | None = None  # None: the generator's own (Generator.max_tokens)
    max_pixels: int = settings.MAX_PIXELS
    media_root: str = "."
    staging_root: str | None = STAGING_ROOT
    task_key: str = TASK_KEY
    try_number: int | str | None = TRY_NUMBER

    def options(self) -> dict[str, Any]:
        """The fields as ``JobOptions`` keyword arguments (empty strings from templates become None)."""
        return {k: (None if v == "" else v) for k, v in asdict(self).items()}

    def argv(self) -> list[str]:
        """``run <generator> --input ... --output ...`` for ``python -m vqa_operators``."""
        args = ["run", self.generator]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("generator", "params") or value is None or value == "":
                continue
            args += [f"--{f.name.replace('_', '-')}", str(value)]
        for key, value in self.params.items():
            args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
        return args
