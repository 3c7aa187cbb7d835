"""``WorkerSpec``: one description of a worker run, turned into CLI arguments (pods) or JobOptions (in-process).

It names ``JobOptions`` fields and nothing else: a value given by the DAG, a run's param
(``FromParam``, native), or a template of the run's identity (the staged paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


def task_timeout(shard: dict[str, Any] | None) -> int | None:
    """Seconds a worker task over ``shard`` may run (``VQA_TASK_TIMEOUT_SECONDS`` and ``VQA_TASK_SECONDS_PER_ROW``; None: unbounded)."""
    rows = shard.get("rows") if shard else None
    return settings.environment().task_timeout(int(rows) if rows is not None else None)


@dataclass(frozen=True)
class FromParam:
    """An option whose value is the run's param ``name`` as the form or the REST API gave it: native (an int stays an int),
    and never rendered as a template."""

    name: str


def resolve(value: Any, params: Mapping[str, Any]) -> Any:
    """``value`` with each ``FromParam`` in it (at any depth of dicts) replaced by the run's param; a ConfigError if the DAG
    declares no such param (a misspelt name would otherwise leave the option at its default, unseen)."""
    if isinstance(value, FromParam):
        if value.name not in params:
            from vqa_operators.exceptions import ConfigError

            raise ConfigError(f"an option reads the param {value.name!r}, which this DAG does not declare")
        return params[value.name]
    if isinstance(value, dict):
        return {key: resolve(item, params) for key, item in value.items()}
    return value


def from_params(*names: str) -> dict[str, FromParam]:
    """``{name: FromParam(name)}`` for options named as their params are."""
    return {name: FromParam(name) for name in names}


class WorkerSpec:
    """One worker task's run: the generator and its ``JobOptions`` values, each a value, a ``FromParam`` or a template that
    Airflow renders (the staged paths). ``values(context)`` resolves them; ``JobOptions`` checks and converts them, in
    ``plan`` and again in the worker."""

    # Airflow renders the template fields of objects held in an operator's template fields
    template_fields: ClassVar[tuple[str, ...]] = ("options",)

    def __init__(self, generator: str, **options: Any) -> None:
        from vqa_operators.worker.options import JobOptions

        unknown = sorted(set(options) - set(JobOptions.model_fields))
        if unknown:
            raise TypeError(f"WorkerSpec: {', '.join(unknown)} is not a worker option (JobOptions)")
        self.generator = generator
        # the output is staged under the run's folder; media an earlier task of the run wrote there may be read
        self.options: dict[str, Any] = {"output": STAGED_OUTPUT_URI, "staging_root": STAGING_ROOT, **options}

    def __repr__(self) -> str:
        return f"WorkerSpec({self.generator!r}, {self.options!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerSpec) and (self.generator, self.options) == (other.generator, other.options)

    def get(self, name: str) -> Any:
        """One option as written (a value, a FromParam or a template)."""
        return self.options.get(name)

    def with_options(self, **options: Any) -> WorkerSpec:
        """A copy with ``options`` set."""
        return WorkerSpec(self.generator, **{**self.options, **options})

    def values(self, context: Any) -> dict[str, Any]:
        """The options of this try, once Airflow has rendered the templates: the params filled in, and the task's identity
        (which names its checkpoint: every try of one task instance shares it) and try."""
        ti = context["ti"]
        identity = {"try_number": ti.try_number}
        if "task_key" not in self.options:
            identity["task_key"] = f"{context['dag'].dag_id}/{ti.task_id}/{context['run_id']}/{ti.map_index}"
        return {"generator": self.generator, **identity, **resolve(self.options, context.get("params") or {})}
