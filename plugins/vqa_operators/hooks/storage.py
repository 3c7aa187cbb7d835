"""``s3_storage``: the project's Storage, with S3 reached through an Airflow AWS connection."""

from __future__ import annotations

from typing import Any


def s3_storage(aws_conn_id: str | None) -> Any:
    """A Storage whose S3 client comes from the ``aws_conn_id`` connection (the default AWS chain if None)."""
    from vqa_operators.storage import Storage
    from vqa_operators.storage.uris import store_config

    if aws_conn_id is None:
        return Storage()
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    # the store's retry policy with the connection's credentials and endpoint
    return Storage(s3_client=S3Hook(aws_conn_id=aws_conn_id, config=store_config()).get_conn())
