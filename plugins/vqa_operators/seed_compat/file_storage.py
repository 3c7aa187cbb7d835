"""``FileStorage``: the seeds' step-numbered JSONL cache, so their Example Usage runs unchanged.

Step semantics follow the original toolkit: ``step()`` advances the operator step (and returns a
copy); ``read`` reads the current step (step 0 is ``first_entry_file_name``) and ``write`` writes
``<cache_path>/<file_name_prefix>_step<N+1>.jsonl``. Rows that fail are written beside it as
``..._step<N+1>.errors.jsonl`` so that no input row is lost.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from vqa_operators.exceptions import ConfigError
from vqa_operators.storage.jsonl import BadLine, JsonlWriter, read_jsonl
from vqa_operators.storage.uris import Storage, errors_uri_for, join_uri

if TYPE_CHECKING:
    import pandas as pd


class FileStorage:
    """Step-numbered JSONL storage on a local folder or an ``s3://`` prefix."""

    def __init__(
        self,
        first_entry_file_name: str,
        cache_path: str = "./cache",
        file_name_prefix: str = "dataflow_cache_step",
        cache_type: str = "jsonl",
        media_key: str = "image",
        media_type: str = "image",
        *,
        storage: Storage | None = None,
    ) -> None:
        if cache_type != "jsonl":
            raise ConfigError(f"cache_type {cache_type!r} is not supported; use 'jsonl'")
        self.first_entry_file_name = first_entry_file_name
        self.cache_path = cache_path
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.media_key = media_key
        self.media_type = media_type
        self.operator_step = -1
        self.storage = storage or Storage()
        self.bad_lines: list[BadLine] = []

    def step(self) -> FileStorage:
        """Advance to the next operator step and return a copy pinned at that step."""
        self.operator_step += 1
        return copy.copy(self)

    def reset(self) -> FileStorage:
        """Go back to before the first step."""
        self.operator_step = -1
        return self

    def _path(self, step: int) -> str:
        if step < 0:
            raise ConfigError("call storage.step() before reading or writing")
        if step == 0:
            return self.first_entry_file_name
        return join_uri(self.cache_path, f"{self.file_name_prefix}_step{step}.{self.cache_type}")

    @property
    def read_path(self) -> str:
        """Where ``read`` reads at the current step."""
        return self._path(self.operator_step)

    @property
    def write_path(self) -> str:
        """Where ``write`` writes at the current step."""
        return self._path(self.operator_step + 1)

    @property
    def errors_path(self) -> str:
        """Where rows that failed at the current step are written."""
        return errors_uri_for(self.write_path)

    def read_rows(self) -> list[dict[str, Any]]:
        """Read the current step as dicts; unusable lines are kept in ``bad_lines`` for the errors file."""
        rows: list[dict[str, Any]] = []
        self.bad_lines = []
        for _, item in read_jsonl(self.storage.iter_lines(self.read_path)):
            if isinstance(item, BadLine):
                self.bad_lines.append(item)
            else:
                rows.append(item)
        return rows

    def read(self, output_type: Literal["dataframe", "dict"] = "dataframe") -> pd.DataFrame | list[dict[str, Any]]:
        """Read the current step as a DataFrame (default) or a list of dicts."""
        rows = self.read_rows()
        if output_type == "dict":
            return rows
        if output_type != "dataframe":
            raise ConfigError(f"output_type must be 'dataframe' or 'dict', not {output_type!r}")
        import pandas as pd

        return pd.DataFrame.from_records(rows)

    def _write_rows(self, uri: str, rows: Iterable[Any]) -> int:
        with self.storage.open_atomic(uri) as handle:
            writer = JsonlWriter(handle)
            for row in rows:
                writer.write(row)
        return writer.count

    def write(self, data: pd.DataFrame | Iterable[dict[str, Any]]) -> str:
        """Write rows (a DataFrame or dicts) atomically as the next step; return its path."""
        self._write_rows(self.write_path, records(data))
        return self.write_path

    def write_errors(self, errors: Iterable[dict[str, Any]]) -> str:
        """Write error entries for the next step atomically (an empty file when there are none)."""
        self._write_rows(self.errors_path, errors)
        return self.errors_path


def records(data: Any) -> list[dict[str, Any]]:
    """Rows of a DataFrame (cells pandas filled for absent keys dropped) or of an iterable of dicts."""
    if hasattr(data, "to_dict"):
        out = []
        for row in data.to_dict(orient="records"):
            # pandas fills keys a row did not have with NaN; write the row as it came in
            out.append({k: v for k, v in row.items() if not (isinstance(v, float) and v != v)})
        return out
    return [dict(r) for r in data]
