"""``WorkerSpec``: one description of a worker run, turned into CLI arguments (pods) or JobOptions (in-process)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vqa_operators.media import DEFAULT_MAX_PIXELS

# Staged outputs live under the run's identity, never the clock: a retry rewrites the same key.
STAGED_OUTPUT_URI = "{{ params.output_prefix.rstrip('/') }}/{{ dag.dag_id }}/{{ run_id }}/{{ task.task_id }}.jsonl"


@dataclass
class WorkerSpec:
    """The worker's arguments; string fields may hold Jinja templates that Airflow renders."""

    # Airflow renders the template fields of objects held in an operator's template fields
    template_fields: ClassVar[tuple[str, ...]] = ("input_uri", "output_uri", "errors_uri", "model", "params", "concurrency", "seed", "media_root")

    generator: str
    input_uri: str
    output_uri: str = STAGED_OUTPUT_URI
    errors_uri: str | None = None
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    concurrency: int | str = 64
    seed: int | str | None = None
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    media_root: str = "."

    def argv(self) -> list[str]:
        """``run <generator> --input ... --output ...`` for ``python -m vqa_operators``."""
        args = ["run", self.generator, "--input", self.input_uri, "--output", self.output_uri]
        if self.errors_uri:
            args += ["--errors", self.errors_uri]
        if self.model:
            args += ["--model", self.model]
        args += ["--concurrency", str(self.concurrency)]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        args += [
            "--temperature", str(self.temperature),
            "--top-p", str(self.top_p),
            "--max-tokens", str(self.max_tokens),
            "--max-pixels", str(self.max_pixels),
            "--media-root", self.media_root,
        ]
        for key, value in self.params.items():
            args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
        return args
