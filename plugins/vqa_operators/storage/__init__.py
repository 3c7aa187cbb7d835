"""Storage: local paths and ``s3://`` URIs, streaming JSONL, atomic writes, and the seeds' FileStorage."""

from vqa_operators.storage.jsonl import BadLine, JsonlWriter, dumps_line, read_jsonl
from vqa_operators.storage.uris import Storage, errors_uri_for, is_s3, join_uri, split_s3

__all__ = [
    "BadLine",
    "JsonlWriter",
    "Storage",
    "dumps_line",
    "errors_uri_for",
    "is_s3",
    "join_uri",
    "read_jsonl",
    "split_s3",
]
