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
from pathlib import Path
from typing import Any

import jinja2

from vqa_operators.exceptions import ConfigError, RowError
from vqa_operators.generators import generator_class
from vqa_operators.generators.base import PROVENANCE_KEY, OutputFields
from vqa_operators.media import MediaReader
from vqa_operators.storage.jsonl import read_jsonl
from vqa_operators.storage.uris import Storage, beside

log = logging.getLogger("vqa_operators.preview")

TEMPLATE = Path(__file__).resolve().parents[2] / "include" / "report" / "preview.html.j2"
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


def _paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [p for p in value if isinstance(p, str)] if isinstance(value, list) else []


def _pers_pair(text: str) -> dict[str, str]:
    question, sep, answer = text.partition(" Answer: ")
    return {"question": question.removeprefix("Question: "), "answer": answer} if sep else {"question": "", "answer": text}


def output_fields(generator: str, row: dict[str, Any] | None) -> OutputFields:
    """Where ``generator``'s rows keep their QA and media, with the options the run used (from a row's provenance)."""
    cls = generator_class(generator)
    options = ((row or {}).get(PROVENANCE_KEY) or {}).get(generator, {}).get("options")
    try:
        parsed = cls.parse_options(options if isinstance(options, dict) else None)
    except ConfigError:  # options of another version of the generator: its defaults
        parsed = cls.parse_options(None)
    return cls.output_fields(parsed)


def describe_row(fields: OutputFields, n: int, row: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of one output row: its media paths, title and QA pairs, where ``fields`` says they are."""
    provenance = row.get(PROVENANCE_KEY) or {}
    value = row.get(fields.qa)
    qa: list[dict[str, Any]]
    if fields.form == "text":
        qa = [_pers_pair(value)] if isinstance(value, str) else []
    elif fields.form == "labelled":
        qa = [
            {"labels": _paths(p.get("Label")), "question": p.get("Question", ""), "answer": p.get("Answer", "")}
            for p in value or [] if isinstance(p, dict)
        ] if isinstance(value, list) else []
    else:
        qa = [{"question": p.get("question", ""), "answer": p.get("answer", "")} for p in value or [] if isinstance(p, dict)] if isinstance(value, list) else []
    if fields.clips is not None:
        sent = (provenance.get("video_qa_initial") or {}).get("frames_sent")
        frames = [f["path"] for f in sent if isinstance(f, dict) and isinstance(f.get("path"), str)] if isinstance(sent, list) else []
        clips = row.get(fields.clips)
        if not frames and isinstance(clips, list):
            frames = [p for clip in clips if isinstance(clip, dict) for p in _paths(clip.get("Frames_Images"))]
        title = str(row.get("id") or row.get("Meta") or "")[:160]
        frames_total = (provenance.get("video_qa_initial") or {}).get("frames_total")
        return {"kind": "video", "n": n, "title": title, "paths": frames, "qa": qa, "frames_total": frames_total}
    paths = _paths(row.get(fields.images)) if fields.images else []
    title = ", ".join(paths)[:160]
    return {"kind": "image", "n": n, "title": title, "paths": paths, "qa": qa}


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
                        "detail": str(entry.get("detail", ""))[:RAW_OUTPUT_SHOWN],
                        "raw_output": str(entry.get("raw_output") or entry.get("raw_line") or "")[:RAW_OUTPUT_SHOWN],
                    }
                )
    return sorted(groups.values(), key=lambda g: (-g.count, g.reason))


def render_preview(
    storage: Storage,
    manifest: dict[str, Any],
    *,
    title: str,
    media_root: str = ".",
    allowed_roots: list[str] | None = None,
    max_rows: int = 50,
    examples_per_reason: int = 5,
) -> bytes:
    """The HTML page for a merged run ``manifest`` (from ``merge_run``)."""
    shown = [(n, row) for n, row in itertools.islice(read_jsonl(storage.iter_lines(manifest["output"])), max_rows) if isinstance(row, dict)]
    fields = output_fields(manifest["generator"], shown[0][1] if shown else None)
    rows = [describe_row(fields, n, row) for n, row in shown]
    reader = MediaReader(storage, media_root=media_root, allowed_roots=allowed_roots)
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="vqa-preview") as pool:
        for row in rows:
            row["media"] = list(pool.map(lambda p: _media(reader, p), row.pop("paths")))
    stages = manifest.get("stages") or {}
    error_files = [stage["errors"] for stage in stages.values()] or [manifest["errors"]]
    groups = failure_groups(storage, error_files, examples_per_reason)
    counted = sum(g.count for g in groups)
    if counted != manifest["rows_failed"]:
        log.warning("the errors files hold %d rows but the manifest reports %d failed", counted, manifest["rows_failed"])
    page = _template().render(title=title, manifest=manifest, rows=rows, failures=groups, error_files=error_files)
    return page.encode("utf-8")


def write_preview(storage: Storage, manifest: dict[str, Any], **kwargs: Any) -> str:
    """Render the preview and write it beside the output as ``<output name>.preview.html``; return its URI."""
    uri = beside(manifest["output"], ".preview.html")
    page = render_preview(storage, manifest, **kwargs)
    with storage.open_atomic(uri, content_type="text/html; charset=utf-8") as handle:
        handle.write(page)
    return uri
