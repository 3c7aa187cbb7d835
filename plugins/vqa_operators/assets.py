"""The datasets the DAGs publish, as Airflow Assets: downstream DAGs (training, evaluation) schedule on them.

Each DAG's ``merge`` task has its dataset's asset as an outlet. When a run succeeds, Airflow
records an asset event whose ``extra`` holds the run's counts and the dataset's URIs
(``event_extra``); a failed run records none. A consumer schedules on the asset and reads the
event::

    from airflow.sdk import dag, task
    from vqa_operators.assets import dataset_asset

    @dag(schedule=[dataset_asset("image_qa")])
    def train():
        @task
        def fit(*, triggering_asset_events):
            for event in triggering_asset_events[dataset_asset("image_qa")]:
                print(event.extra["output"], event.extra["rows_out"])

The output's location is a per-run param, so the asset names the dataset (``vqa.<dag_id>``), not
a path; the paths are in the event. It has no URI either: a URI makes Airflow load every
provider's URI handlers (and boto3) while parsing the DAG files. With ``VQA_ASSET_PARTITIONS`` on, a run
with a logical date tags its event with that date (``ds``), for partition-aware consumers
(Airflow's partitioned timetables). Airflow then queues only partition-aware consumers for that
event, so it is off by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset

if TYPE_CHECKING:
    from vqa_operators.records import RunManifest

ASSET_GROUP = "vqa-datasets"
# what a consumer needs to find and judge the dataset without reading the manifest (``records.RunManifest``'s fields)
EVENT_KEYS = (
    "dag_id", "run_id", "generator", "input", "output", "errors", "rejected", "manifest", "preview",
    "rows_in", "rows_out", "rows_failed", "rows_rejected", "pairs_kept", "pairs_rejected", "acceptance_rate", "exports", "estimate",
)  # fmt: skip
# of each stage: what made it, and where its failed rows are
STAGE_KEYS = ("kind", "generator", "model", "prompt_sha256", "errors")


def dataset_asset(dag_id: str) -> Asset:
    """The asset ``dag_id``'s runs publish, ``vqa.<dag_id>`` (a name, no URI: see the module docstring)."""
    return Asset(name=f"vqa.{dag_id}", group=ASSET_GROUP)


def event_extra(manifest: RunManifest) -> dict[str, Any]:
    """The asset event's ``extra``: the merged manifest's counts and the dataset's URIs, and each stage's model, prompts and errors file."""
    found = manifest.dump()
    return {
        **{key: found[key] for key in EVENT_KEYS},
        "stages": {name: {key: stage[key] for key in STAGE_KEYS} for name, stage in found["stages"].items()},
    }


def published(triggering_asset_events: Any) -> list[dict[str, Any]]:
    """Each dataset a consumer run was started for: the asset, the producing run and the event's extra, oldest first."""
    found = []
    for asset, events in triggering_asset_events.items():
        for event in events:
            found.append(
                {
                    "asset": getattr(asset, "name", str(asset)),
                    "source_dag_id": event.source_dag_id,
                    "source_run_id": event.source_run_id,
                    "partition_key": getattr(event, "partition_key", None),
                    **event.extra,
                }
            )
    return sorted(found, key=lambda item: (item["source_dag_id"] or "", item["source_run_id"] or ""))
