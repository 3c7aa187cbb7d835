"""
### Dataset ready (a downstream DAG to copy)

Starts when `image_qa`, `pers_qa` or `video_qa` publishes a dataset, that is when one of their
runs succeeds: it is scheduled on their assets `vqa.image_qa`, `vqa.pers_qa` and `vqa.video_qa`.
A failed run publishes nothing, so it starts nothing. Its one task logs each new dataset (the
producing run, its output, errors and rejected files, the manifest, the counts and the acceptance
rate, all from the asset event's `extra`) and returns them.

Copy it to start training or evaluation on each new dataset. It is created paused: unpause it
to use it as it is.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import dag, task

from vqa_operators.assets import dataset_asset
from vqa_operators.operators.dag_config import DAG_DEFAULTS


@dag(
    dag_id="dataset_ready",
    doc_md=__doc__,
    tags=["vqa", "consumer"],
    is_paused_upon_creation=True,
    **{**DAG_DEFAULTS, "schedule": dataset_asset("image_qa") | dataset_asset("pers_qa") | dataset_asset("video_qa")},
)
def dataset_ready() -> None:
    @task
    def new_datasets(*, triggering_asset_events: Any = None) -> list[dict[str, Any]]:
        from vqa_operators.assets import published

        datasets = []
        for item in published(triggering_asset_events):
            if item.get("estimate"):
                print(
                    f"{item['asset']} from {item['source_dag_id']} run {item['source_run_id']}: an estimate's sample, not a dataset; skipped"
                )
                continue
            datasets.append(item)
            print(
                f"{item['asset']} from {item['source_dag_id']} run {item['source_run_id']}: {item['rows_out']} rows out of {item['rows_in']} "
                f"({item['rows_failed']} failed, {item['rows_rejected']} rejected; acceptance {item['acceptance_rate']}) -> {item['output']}; "
                f"errors by stage {item['errors']}, rejected {item['rejected']}, manifest {item['manifest']}"
            )
        return datasets

    new_datasets()


dataset_ready()
