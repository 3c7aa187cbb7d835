"""The QA preview: one self-contained HTML page beside a run's output, to look at before trusting a dataset.

It shows the first rows of the output, each image as a thumbnail beside its QA pairs (for
video, the strip of frames that were sent to the model, with the labelled QA), and every
failure of every stage grouped by reason, with a few examples each. Thumbnails are embedded as
small JPEG data URLs, so the page opens from a presigned URL with nothing else to fetch. Its
size is bounded by ``max_rows`` and ``examples_per_reason``, whatever the run's size: the errors
files are streamed to count reasons.

Plain Python: it knows nothing of Airflow. The template is ``include/report/preview.html.j2``.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jinja2

from vqa_operators import settings
from vqa_operators.exceptions import RowError
from vqa_operators.generators import row_output_fields
from vqa_operators.generators.base import input_line
from vqa_operators.media import MediaReader
from vqa_operators.records import RejectedEntry, RunManifest
from vqa_operators.row_view import DETAIL_SHOWN, describe_row
from vqa_operators.storage.jsonl import read_jsonl
from vqa_operators.storage.uris import Storage

log = logging.getLogger("vqa_operators.preview")

TEMPLATE = settings.include_dir() / "report" / "preview.html.j2"
THUMB_SIZE = (192, 144)
RAW_OUTPUT_SHOWN = 300


@dataclass
class FailureGroup:
    """One failure reason: how many rows, and the first few of them."""

    reason: str
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(TEMPLATE.read_text(encoding="utf-8"))


def thumbnail(data: bytes) -> str:
    """A small JPEG data URL of an image (EXIF rotation applied)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", THUMB_SIZE)
        small = ImageOps.exif_transpose(img).convert("RGB")
        small.thumbnail(THUMB_SIZE)
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _media(reader: MediaReader, path: str) -> dict[str, Any]:
    try:
        return {"path": path, "src": thumbnail(reader.storage.read_bytes(reader.resolve(path))), "problem": None}
    except RowError as err:
        return {"path": path, "src": None, "problem": err.reason}
    except FileNotFoundError:
        return {"path": path, "src": None, "problem": "image_not_found"}
    except (OSError, ValueError) as err:  # unreadable or not an image (PIL raises both)
        return {"path": path, "src": None, "problem": f"unreadable: {type(err).__name__}"}


def failure_groups(storage: Storage, error_files: list[str], examples_per_reason: int) -> list[FailureGroup]:
    """Every errors file streamed once: rows per reason (most first), with the first few of each."""
    groups: dict[str, FailureGroup] = {}
    for uri in error_files:
        if not storage.exists(uri):
            continue
        for line, entry in read_jsonl(storage.iter_lines(uri)):
            if not isinstance(entry, dict):
                entry = {"reason": "unreadable_errors_line", "detail": f"line {line} of {uri}"}
            group = groups.setdefault(str(entry.get("reason")), FailureGroup(str(entry.get("reason"))))
            group.count += 1
            if len(group.examples) < examples_per_reason:
                group.examples.append(
                    {
                        "stage": entry.get("stage", ""),
                        "line": entry.get("line", ""),
                        "detail": str(entry.get("detail", ""))[:DETAIL_SHOWN],
                        "raw_output": str(entry.get("raw_output") or entry.get("raw_line") or entry.get("pair") or "")[
                            :RAW_OUTPUT_SHOWN
                        ],
                    }
                )
    return sorted(groups.values(), key=lambda g: (-g.count, g.reason))


def render_preview(
    storage: Storage,
    manifest: RunManifest,
    *,
    title: str,
    media_root: str = ".",
    allowed_roots: list[str] | None = None,
    max_rows: int = 50,
    examples_per_reason: int = 5,
) -> bytes:
    """The HTML page for a merged run ``manifest`` (from ``merge.merge_run``)."""
    shown = [
        (n, row)
        for n, row in itertools.islice(read_jsonl(storage.iter_lines(manifest.output)), max_rows)
        if isinstance(row, dict)
    ]
    rejected_file = manifest.rejected
    lines = {input_line(row, n): n for n, row in shown}
    by_line: dict[int, list[RejectedEntry]] = {}
    if rejected_file and shown:  # the rejected pairs of the rows shown: one pass over the rejected file
        for _, entry in read_jsonl(storage.iter_lines(rejected_file)):
            if isinstance(entry, dict) and entry.get("line") in lines and not entry.get("row_rejected"):
                by_line.setdefault(entry["line"], []).append(RejectedEntry.model_validate(entry))
    rows = [describe_row(row_output_fields(manifest.generator, row), n, row, by_line.get(input_line(row, n))) for n, row in shown]
    reader = MediaReader(storage, media_root=media_root, allowed_roots=allowed_roots)
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="vqa-preview") as pool:
        for row in rows:
            row.media = list(pool.map(lambda p: _media(reader, p), row.paths))
    groups = failure_groups(storage, list(manifest.errors.values()), examples_per_reason)
    counted = sum(g.count for g in groups)
    if counted != manifest.rows_failed:
        log.warning("the errors files hold %d rows but the manifest reports %d failed", counted, manifest.rows_failed)
    rejections = failure_groups(storage, [rejected_file], examples_per_reason) if rejected_file else []
    page = _template().render(
        title=title,
        manifest=manifest,
        rows=rows,
        failures=groups,
        rejections=rejections,
        acceptance=manifest.acceptance_rate,
        scores=manifest.quality_scores.describe() if manifest.quality_scores else None,
    )
    return page.encode("utf-8")


def write_preview(storage: Storage, manifest: RunManifest, **kwargs: Any) -> str:
    """Render the preview and write it where the manifest names it (``<output name>.preview.html``); return its URI."""
    uri = manifest.preview
    page = render_preview(storage, manifest, **kwargs)
    with storage.open_atomic(uri, content_type="text/html; charset=utf-8") as handle:
        handle.write(page)
    return uri
