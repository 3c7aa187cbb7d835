"""Training-ready copies of a run's dataset, in the run's folder: what fine-tuning code reads as it is.

``export_formats`` chooses among:

- ``hf``: a Hub-ready folder, ``hf/``: ``data/train-NNNNN.parquet`` shards of at most
  ``shard_bytes`` each, with the images embedded (``datasets``' ``Image`` feature) and TRL's
  vision ``messages`` layout (content parts ``{"type": "image"}`` and ``{"type": "text", "text"}``),
  and a ``README.md`` whose YAML front matter declares the config, the features and the split.
  ``datasets.load_dataset("<run>/hf")`` loads it, and ``push_to_hub`` uploads it as it is.
- ``sharegpt``: LLaMA-Factory's ShareGPT form, ``<output name>.sharegpt.json``: ``messages``
  (``role``/``content``) with ``images`` (one ``<image>`` per image in the first user turn), or
  for a video row whose frames share one size ``videos`` (its frames as one video, one
  ``<video>``), registered in the run folder's ``dataset_info.json``.
- ``llava``: LLaVA's ``<output name>.llava.json``, ``{"id", "image", "conversations"}``, one
  ``<image>`` line per image before the first question.
- ``parquet``: one flat Parquet file, ``<output name>.parquet``, with the media's own URIs (and,
  with ``embed_images``, their bytes): the earlier export, kept for its readers.

With ``copy_media`` (the default) the media the kept rows use (their images; for a video the
frames the model was shown) are copied into the run's folder as ``media/<sha256>.<ext>``, and the
``llava`` and ``sharegpt`` files point at them by paths relative to that folder: a copy of the
folder (``aws s3 sync``) is a dataset a trainer reads with no path rewritten. Every sample's media
placeholders equal its media count; that is checked before a sample is written, and an export
with a mismatch writes nothing. Each pair keeps its labels (as the generator's output declaration
reads them), and for video the clips it is about with their ``start``/``end`` seconds.

Plain Python: it knows nothing of Airflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any, ClassVar, Literal

from vqa_operators.exceptions import ConfigError, ExportError, RowError
from vqa_operators.generators import row_output_fields
from vqa_operators.media import MediaReader
from vqa_operators.records import FORMATS, Format, RunManifest
from vqa_operators.row_view import describe_row
from vqa_operators.storage import Storage, read_jsonl
from vqa_operators.storage.uris import beside

IMAGE_TOKEN = "<image>"  # noqa: S105 - a placeholder, not a secret
VIDEO_TOKEN = "<video>"  # noqa: S105
# rows per Parquet row group (and per write)
BATCH_ROWS = 512
# the hf export's Parquet shards: at most this many bytes of media and text each
SHARD_BYTES = 256 * 1024**2
CARD_NAME = "README.md"
MEDIA_FOLDER = "media"
HF_FOLDER = "hf"
DATASET_INFO = "dataset_info.json"
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg"}


@dataclass
class ExportPair:
    """One QA pair as the exports write it: its text, its labels, and the part of the video it is about (video only)."""

    question: str
    answer: str
    labels: list[str] = field(default_factory=list)
    clips: list[int] = field(default_factory=list)
    start: float | None = None
    end: float | None = None


@dataclass
class Example:
    """One training example: a kept row, its media (URIs), its pairs, its meta text."""

    id: str
    kind: Literal["image", "video"]
    media: list[str]
    pairs: list[ExportPair]
    meta: str | None
    dataset: str


def clean(text: str) -> str:
    """Model text with the trainers' placeholders made inert: a ``<image>`` written by the model would count as an image."""
    return text.replace(IMAGE_TOKEN, "[image]").replace(VIDEO_TOKEN, "[video]")


def examples(storage: Storage, manifest: RunManifest, reader: MediaReader, dataset: str) -> Iterator[Example]:
    """One example per output row, in order: its id, its media's URIs, its pairs as the output declaration reads them."""
    for n, row in read_jsonl(storage.iter_lines(manifest.output)):
        if not isinstance(row, dict):
            raise ExportError(f"{manifest.output} line {n} is not a JSON object: the merged output is damaged")
        fields = row_output_fields(manifest.generator, row)
        shown = describe_row(fields, n, row)
        try:
            media = [reader.resolve(path) for path in shown.paths]
        except RowError as err:
            raise ExportError(f"{manifest.output} line {n}: {err.detail}") from None
        pairs = [
            ExportPair(
                question=clean(p.question),
                answer=clean(p.answer),
                labels=p.labels,
                clips=p.clips,
                start=p.span[0] if p.span else None,
                end=p.span[1] if p.span else None,
            )
            for p in shown.qa
        ]
        meta = row.get(fields.meta) if fields.meta else None
        yield Example(
            id=str(row["id"]) if "id" in row else f"line-{n}",
            kind=shown.kind,
            media=media,
            pairs=pairs,
            meta=meta if isinstance(meta, str) else None,
            dataset=dataset,
        )


class MediaFiles:
    """The media of the exported rows, read once each: content-addressed names, and copies in the run's folder (``copy``)."""

    def __init__(self, storage: Storage, folder: str, *, copy: bool) -> None:
        self.storage = storage
        self.folder = folder
        self.copy = copy
        self.names: dict[str, str] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self.written: set[str] = set()

    def read(self, uri: str, row_id: str) -> tuple[str, bytes]:
        """``(<sha256>.<ext>, bytes)`` of one medium; a clear error if it has gone since the row was generated."""
        try:
            data = self.storage.read_bytes(uri)
        except OSError as exc:
            raise ExportError(f"cannot read {uri} (row {row_id}) for the export: {exc.strerror or exc}") from None
        ext, self.sizes[uri] = image_format(data, uri)
        name = f"{hashlib.sha256(data).hexdigest()}.{ext}"
        self.names[uri] = name
        if self.copy and name not in self.written:
            target = f"{self.folder}/{MEDIA_FOLDER}/{name}"
            if not self.storage.exists(target):  # content-addressed: an existing copy holds these bytes
                with self.storage.open_atomic(target) as handle:
                    handle.write(data)
            self.written.add(name)
        return name, data

    def path(self, uri: str) -> str:
        """Where an exported file points for a medium already read: its copy, relative to the run's folder, or its own URI."""
        return f"{MEDIA_FOLDER}/{self.names[uri]}" if self.copy else uri


def image_format(data: bytes, uri: str) -> tuple[str, tuple[int, int]]:
    """The image's usual file extension and its size, from its bytes (Pillow reads the header only)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return EXTENSIONS.get(img.format or "", (img.format or "img").lower()), img.size
    except (OSError, SyntaxError, ValueError):
        raise ExportError(f"{uri} is not an image Pillow can read: it cannot be exported") from None


# --- the formats ------------------------------------------------------------------------------------------------


def llava_item(example: Example, paths: list[str]) -> dict[str, Any]:
    """``{"id", "image", "conversations", "qa"}``: one ``<image>`` line per image before the first question."""
    turns = []
    for k, pair in enumerate(example.pairs):
        prefix = f"{IMAGE_TOKEN}\n" * len(paths) if k == 0 else ""
        turns += [{"from": "human", "value": prefix + pair.question}, {"from": "gpt", "value": pair.answer}]
    image: str | list[str] = paths[0] if len(paths) == 1 else paths
    return {"id": example.id, "image": image, "conversations": turns, "qa": [asdict(p) for p in example.pairs]}


def sharegpt_item(example: Example, paths: list[str], *, as_video: bool) -> dict[str, Any]:
    """LLaMA-Factory's ShareGPT: ``messages`` with ``images``, or with ``as_video`` ``videos``: a video row's frames as one video."""
    video = as_video
    placeholders = VIDEO_TOKEN if video else IMAGE_TOKEN * len(paths)
    messages = []
    for k, pair in enumerate(example.pairs):
        messages += [
            {"role": "user", "content": (placeholders if k == 0 else "") + pair.question},
            {"role": "assistant", "content": pair.answer},
        ]
    media: dict[str, Any] = {"videos": [paths]} if video else {"images": paths}
    return {"id": example.id, "messages": messages, **media, "qa": [asdict(p) for p in example.pairs]}


def messages(example: Example, images: int) -> list[dict[str, Any]]:
    """TRL's vision conversation: the first user turn holds one ``{"type": "image"}`` part per image before its text."""
    turns = []
    for k, pair in enumerate(example.pairs):
        parts = [{"type": "image", "text": None}] * (images if k == 0 else 0) + [{"type": "text", "text": pair.question}]
        turns += [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": pair.answer}]}]
    return turns


def check_placeholders(example_id: str, form: str, counted: int, media: int) -> None:
    """A sample whose placeholders do not match its media is never written (the mismatch trainers refuse)."""
    if counted != media:
        raise ExportError(
            f"row {example_id}: {counted} media placeholders in its {form} sample for {media} media files; nothing is exported"
        )


def placeholders_of(item: dict[str, Any], form: str) -> tuple[int, int]:
    """(placeholders, media) of one written sample."""
    if form == "llava":
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        return sum(t["value"].count(IMAGE_TOKEN) for t in item["conversations"]), len(images)
    if form == "sharegpt":
        text = "".join(m["content"] for m in item["messages"])
        if "videos" in item:
            return text.count(VIDEO_TOKEN) + text.count(IMAGE_TOKEN), len(item["videos"])
        return text.count(IMAGE_TOKEN) + text.count(VIDEO_TOKEN), len(item["images"])
    parts = [p for m in item["messages"] for p in m["content"]]
    return sum(p["type"] == "image" for p in parts), len(item["images"])


_TEXT = {"dtype": "string", "_type": "Value"}
_FLOAT = {"dtype": "float64", "_type": "Value"}
_QA_FEATURES = {
    "question": _TEXT,
    "answer": _TEXT,
    "labels": {"feature": _TEXT, "_type": "List"},
    "clips": {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "List"},
    "start": _FLOAT,
    "end": _FLOAT,
}


def _qa_type() -> Any:
    import pyarrow as pa

    return pa.list_(
        pa.struct(
            [
                ("question", pa.string()),
                ("answer", pa.string()),
                ("labels", pa.list_(pa.string())),
                ("clips", pa.list_(pa.int64())),
                ("start", pa.float64()),
                ("end", pa.float64()),
            ]
        )
    )


def hf_schema() -> Any:
    """The hf shards' schema, with ``datasets``' features in its metadata (``images`` load as images)."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    fields = [
        ("id", pa.string()),
        ("images", pa.list_(image)),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))),
        ("qa", _qa_type()),
        ("meta", pa.string()),
        ("dataset", pa.string()),
    ]
    features = {
        "id": _TEXT,
        "images": {"feature": {"_type": "Image"}, "_type": "List"},
        "messages": {
            "feature": {"role": _TEXT, "content": {"feature": {"type": _TEXT, "text": _TEXT}, "_type": "List"}},
            "_type": "List",
        },
        "qa": {"feature": _QA_FEATURES, "_type": "List"},
        "meta": _TEXT,
        "dataset": _TEXT,
    }
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


# the same features as the hf card's YAML declares them (datasets' own YAML form)
HF_FEATURES_YAML = """  features:
  - name: id
    dtype: string
  - name: images
    list: image
  - name: messages
    list:
    - name: role
      dtype: string
    - name: content
      list:
      - name: type
        dtype: string
      - name: text
        dtype: string
  - name: qa
    list:
    - name: question
      dtype: string
    - name: answer
      dtype: string
    - name: labels
      list: string
    - name: clips
      list: int64
    - name: start
      dtype: float64
    - name: end
      dtype: float64
  - name: meta
    dtype: string
  - name: dataset
    dtype: string"""


def parquet_schema(embed_images: bool) -> Any:
    """The flat Parquet file's schema, with ``datasets``' features in its metadata (``images`` load as images when embedded)."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if embed_images else pa.string()
    fields = [
        ("id", pa.string()),
        ("images", pa.list_(image)),
        ("qa", _qa_type()),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("meta", pa.string()),
        ("dataset", pa.string()),
    ]
    features = {
        "id": _TEXT,
        "images": {"feature": {"_type": "Image"} if embed_images else _TEXT, "_type": "List"},
        "qa": {"feature": _QA_FEATURES, "_type": "List"},
        "conversations": {"feature": {"from": _TEXT, "value": _TEXT}, "_type": "List"},
        "meta": _TEXT,
        "dataset": _TEXT,
    }
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


class _JsonArray:
    """A JSON array written item by item to an atomic file."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.count = 0
        handle.write(b"[")

    def add(self, item: dict[str, Any]) -> None:
        self.handle.write(b"\n" if self.count == 0 else b",\n")
        self.handle.write(json.dumps(item, ensure_ascii=False).encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        self.handle.write(b"\n]\n")


class _HfShards:
    """The hf folder's Parquet shards: a new one when the current one holds ``shard_bytes``; each an atomic write."""

    def __init__(self, storage: Storage, folder: str, shard_bytes: int) -> None:
        self.storage, self.folder, self.shard_bytes = storage, folder, shard_bytes
        self.schema = hf_schema()
        self.open: contextlib.ExitStack | None = None
        self.writer: Any = None
        self.shards: list[str] = []
        self.size = 0
        self.batch: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any], size: int) -> None:
        if self.writer is not None and self.size + size > self.shard_bytes:
            self.finish()
        if self.writer is None:
            import pyarrow.parquet as pq

            self.open = contextlib.ExitStack()
            uri = f"{self.folder}/data/train-{len(self.shards):05d}.parquet"
            self.writer = self.open.enter_context(
                pq.ParquetWriter(self.open.enter_context(self.storage.open_atomic(uri)), self.schema, compression="zstd")
            )
            self.shards.append(uri)
            self.size = 0
        self.batch.append(row)
        self.size += size
        if len(self.batch) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            import pyarrow as pa

            self.writer.write_table(pa.Table.from_pylist(self.batch, schema=self.schema))
            self.batch.clear()

    def finish(self) -> None:
        """Publish the shard being written."""
        if self.open is not None:
            self.flush()
            self.open.close()
        self.open, self.writer = None, None

    def abort(self, error: BaseException) -> None:
        """Leave no shard behind: the one being written is never published, and those published are deleted."""
        self.batch.clear()
        if self.open is not None:
            # unwinding with the error: the atomic write of the open shard publishes nothing
            self.open.__exit__(type(error), error, error.__traceback__)
            self.shards.pop()
        for uri in self.shards:
            self.storage.delete(uri)
        self.open, self.writer = None, None


@dataclass
class Prepared:
    """One example's media as the exporters take them: each medium's stored path and bytes (when some format needs the
    bytes), and the paths the files name (copies relative to the run's folder, or the media's own URIs)."""

    read: list[tuple[str, bytes]]
    paths: list[str]


class Exporter:
    """One format: its files in the run's folder (``uris``), opened before the rows, given each example in order, closed
    (published) after the last, or aborted; ``after`` writes what needs the whole run (a card, a registry)."""

    name: ClassVar[Format]
    # reads each medium's bytes (hf embeds them; sharegpt reads a video's frame sizes); names media files (copies, where copied)
    needs_bytes: bool = True
    names_media: ClassVar[bool] = False

    def __init__(self, storage: Storage, output: str, *, dataset: str, embed_images: bool, shard_bytes: int) -> None:
        self.storage, self.output, self.dataset = storage, output, dataset
        self.embed_images, self.shard_bytes = embed_images, shard_bytes
        self.folder = output.rsplit("/", 1)[0]

    @property
    def uris(self) -> dict[str, str]:
        """What it writes, by name."""
        raise NotImplementedError

    def open(self, stack: contextlib.ExitStack) -> None:
        """Open its files (atomic writes that ``stack`` publishes, or discards on an error)."""

    def add(self, example: Example, prepared: Prepared, media: MediaFiles) -> None:
        """Write one example."""
        raise NotImplementedError

    def close(self) -> None:
        """End its files, after the last example."""

    def abort(self, error: BaseException) -> None:
        """Leave nothing behind that was published before ``error``."""

    def after(self, facts: CardFacts, uris: dict[str, str]) -> None:
        """Write what needs the whole run, once every format's files are published."""


class LlavaExport(Exporter):
    """LLaVA's conversation JSON, ``<output name>.llava.json``."""

    name = "llava"
    needs_bytes = False
    names_media = True

    @property
    def uris(self) -> dict[str, str]:
        return {"llava": beside(self.output, ".llava.json")}

    def open(self, stack: contextlib.ExitStack) -> None:
        self.items = _JsonArray(
            stack.enter_context(self.storage.open_atomic(self.uris["llava"], content_type="application/json"))
        )

    def add(self, example: Example, prepared: Prepared, media: MediaFiles) -> None:
        item = llava_item(example, prepared.paths)
        check_placeholders(example.id, "llava", *placeholders_of(item, "llava"))
        self.items.add(item)

    def close(self) -> None:
        self.items.close()


class ShareGPTExport(Exporter):
    """LLaMA-Factory's ShareGPT form, ``<output name>.sharegpt.json``, registered in the folder's ``dataset_info.json``."""

    name = "sharegpt"
    names_media = True

    @property
    def uris(self) -> dict[str, str]:
        return {"sharegpt": beside(self.output, ".sharegpt.json"), "dataset_info": f"{self.folder}/{DATASET_INFO}"}

    def open(self, stack: contextlib.ExitStack) -> None:
        self.items = _JsonArray(
            stack.enter_context(self.storage.open_atomic(self.uris["sharegpt"], content_type="application/json"))
        )
        self.columns: set[str] = set()

    def add(self, example: Example, prepared: Prepared, media: MediaFiles) -> None:
        # a video's frames go as one video where they can: LLaMA-Factory stacks them, so they must share one size
        as_video = example.kind == "video" and len({media.sizes[uri] for uri in example.media}) == 1
        item = sharegpt_item(example, prepared.paths, as_video=as_video)
        check_placeholders(example.id, "sharegpt", *placeholders_of(item, "sharegpt"))
        self.items.add(item)
        self.columns.add("videos" if as_video else "images")

    def close(self) -> None:
        self.items.close()

    def after(self, facts: CardFacts, uris: dict[str, str]) -> None:
        info = {f"vqa_{self.dataset}": sharegpt_entry(self.uris["sharegpt"].rsplit("/", 1)[1], self.columns or {"images"})}
        with self.storage.open_atomic(self.uris["dataset_info"], content_type="application/json") as handle:
            handle.write((json.dumps(info, indent=2) + "\n").encode("utf-8"))


class HfExport(Exporter):
    """A Hub-ready folder: Parquet shards with the images embedded and TRL's messages, and its card."""

    name = "hf"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shards = _HfShards(self.storage, self.uris["hf"], self.shard_bytes)

    @property
    def uris(self) -> dict[str, str]:
        return {"hf": f"{self.folder}/{HF_FOLDER}"}

    def add(self, example: Example, prepared: Prepared, media: MediaFiles) -> None:
        row = {
            "id": example.id,
            "images": [{"bytes": data, "path": medium} for medium, data in prepared.read],
            "messages": messages(example, len(prepared.read)),
            "qa": [asdict(p) for p in example.pairs],
            "meta": example.meta,
            "dataset": self.dataset,
        }
        check_placeholders(example.id, "hf", *placeholders_of(row, "hf"))
        self.shards.add(
            row, sum(len(data) for _, data in prepared.read) + sum(len(p.question) + len(p.answer) for p in example.pairs)
        )

    def close(self) -> None:
        self.shards.finish()

    def abort(self, error: BaseException) -> None:
        self.shards.abort(error)

    def after(self, facts: CardFacts, uris: dict[str, str]) -> None:
        with self.storage.open_atomic(f"{self.uris['hf']}/{CARD_NAME}", content_type="text/markdown; charset=utf-8") as handle:
            handle.write(dataset_card(facts, uris, data_files="data/train-*.parquet", here=self.uris["hf"]).encode("utf-8"))


class ParquetExport(Exporter):
    """One flat Parquet file, ``<output name>.parquet``, with the media's own URIs (and, with ``embed_images``, their bytes)."""

    name = "parquet"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.needs_bytes = self.embed_images
        self.schema = parquet_schema(self.embed_images)
        self.batch: list[dict[str, Any]] = []

    @property
    def uris(self) -> dict[str, str]:
        return {"parquet": beside(self.output, ".parquet")}

    def open(self, stack: contextlib.ExitStack) -> None:
        import pyarrow.parquet as pq

        self.writer = stack.enter_context(
            pq.ParquetWriter(stack.enter_context(self.storage.open_atomic(self.uris["parquet"])), self.schema, compression="zstd")
        )

    def add(self, example: Example, prepared: Prepared, media: MediaFiles) -> None:
        images: list[Any] = (
            [{"bytes": data, "path": uri} for uri, (_, data) in zip(example.media, prepared.read, strict=True)]
            if self.embed_images
            else list(example.media)
        )
        turns = llava_item(example, list(example.media))["conversations"]
        self.batch.append(
            {
                "id": example.id,
                "images": images,
                "qa": [asdict(p) for p in example.pairs],
                "conversations": turns,
                "meta": example.meta,
                "dataset": self.dataset,
            }
        )
        if len(self.batch) >= BATCH_ROWS:
            _write(self.writer, self.batch, self.schema)

    def close(self) -> None:
        _write(self.writer, self.batch, self.schema)


# the formats, in the order their files are listed
EXPORTERS: dict[Format, type[Exporter]] = {
    "hf": HfExport,
    "sharegpt": ShareGPTExport,
    "llava": LlavaExport,
    "parquet": ParquetExport,
}


def export_run(
    storage: Storage,
    manifest: RunManifest,
    *,
    formats: list[str],
    copy_media: bool = True,
    embed_images: bool = False,
    media_root: str = ".",
    allowed_roots: list[str] | None = None,
    dataset: str = "",
    run_id: str = "",
    shard_bytes: int = SHARD_BYTES,
) -> dict[str, str]:
    """Write ``formats`` and the cards in the run's folder; return their URIs by name (``card``, ``media`` and each format's).

    The rows are read once; each example goes to every format asked for. All or nothing: a sample whose placeholders do
    not match its media, or a medium gone since the row was generated, is an ExportError, and no export file is left behind.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown export formats {unknown}; choose from {list(FORMATS)}")
    folder = manifest.output.rsplit("/", 1)[0]
    name = dataset or manifest.generator
    exporters = [
        cls(storage, manifest.output, dataset=name, embed_images=embed_images, shard_bytes=shard_bytes)
        for fmt, cls in EXPORTERS.items()
        if fmt in formats
    ]
    uris = {key: uri for exporter in exporters for key, uri in exporter.uris.items()}
    reader = MediaReader(storage, media_root=media_root, allowed_roots=allowed_roots)
    # only the formats that name media files use the copies; hf embeds the bytes themselves
    media = MediaFiles(storage, folder, copy=copy_media and any(e.names_media for e in exporters))
    needs_bytes = media.copy or any(e.needs_bytes for e in exporters)
    rows, pairs, labels, kinds = 0, 0, Counter[str](), Counter[str]()
    try:
        with contextlib.ExitStack() as stack:
            for exporter in exporters:
                exporter.open(stack)
            for example in examples(storage, manifest, reader, name):
                read = [media.read(uri, example.id) for uri in example.media] if needs_bytes else []
                prepared = Prepared(
                    read=read, paths=[media.path(uri) for uri in example.media] if needs_bytes else list(example.media)
                )
                for exporter in exporters:
                    exporter.add(example, prepared, media)
                rows += 1
                pairs += len(example.pairs)
                kinds[example.kind] += 1
                labels.update(label for pair in example.pairs for label in pair.labels)
            if rows != manifest.rows_out:
                raise ExportError(f"exported {rows} rows but the manifest counts {manifest.rows_out} rows out")
            for exporter in exporters:
                exporter.close()
    except BaseException as err:
        for exporter in exporters:
            exporter.abort(err)
        raise
    if media.copy:
        uris["media"] = f"{folder}/{MEDIA_FOLDER}"
    facts = CardFacts(
        manifest=manifest, dataset=name, run_id=run_id, rows=rows, pairs=pairs, labels=labels, video="video" in kinds
    )
    for exporter in exporters:
        exporter.after(facts, uris)
    card = f"{folder}/{CARD_NAME}"
    with storage.open_atomic(card, content_type="text/markdown; charset=utf-8") as handle:
        handle.write(
            dataset_card(
                facts, uris, data_files=f"{HF_FOLDER}/data/train-*.parquet" if "hf" in uris else None, here=folder
            ).encode("utf-8")
        )
    return {**uris, "card": card}


def _write(writer: Any, batch: list[dict[str, Any]], schema: Any) -> None:
    import pyarrow as pa

    if batch:
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        batch.clear()


def sharegpt_entry(file_name: str, media: set[str]) -> dict[str, Any]:
    """The ``dataset_info.json`` entry that registers the ShareGPT file with LLaMA-Factory; ``media``: the columns its samples use."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", **{column: column for column in sorted(media)}},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }


# --- the card ---------------------------------------------------------------------------------------------------


@dataclass
class CardFacts:
    """What a card says of the dataset: the run's manifest, and the exported rows, pairs and labels (from the output declaration)."""

    manifest: RunManifest
    dataset: str
    run_id: str
    rows: int
    pairs: int
    labels: Counter[str]
    video: bool


def size_category(rows: int) -> str:
    """The Hub's size category for a dataset of ``rows`` examples."""
    for bound, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if rows < bound:
            return name
    return "10M<n<100M"


def dataset_card(facts: CardFacts, uris: dict[str, str], *, data_files: str | None, here: str) -> str:
    """The card: YAML front matter (license placeholder, task categories, size, config, features), what the dataset holds and how it was made."""
    manifest = facts.manifest
    relative = lambda uri: uri.removeprefix(here.rstrip("/") + "/")  # noqa: E731 - the files are named from where the card lies
    lines = [
        "---",
        "# license: set the license of your data here (https://huggingface.co/docs/hub/repositories-licenses)",
        "license: other",
        f"pretty_name: {json.dumps(f'{facts.dataset} ({facts.run_id})' if facts.run_id else facts.dataset)}",
        "task_categories:",
        "- visual-question-answering",
        "- image-text-to-text",
        "tags:",
        "- synthetic",
        "- vqa",
        *(["- video"] if facts.video else []),
        "size_categories:",
        f"- {size_category(facts.rows)}",
    ]
    if data_files:
        lines += ["configs:", "- config_name: default", "  data_files:", "  - split: train", f"    path: {data_files}"]
        lines += ["dataset_info:", HF_FEATURES_YAML]
    lines += ["---", "", f"# {facts.dataset} · {facts.run_id}".rstrip(" ·"), ""]
    rate = manifest.acceptance_rate
    judged = manifest.pairs_kept + manifest.pairs_rejected
    lines += [
        f"- **Rows**: {facts.rows} in the dataset, of {manifest.rows_in} input rows "
        f"({manifest.rows_failed} failed, {manifest.rows_rejected} rejected by the quality checks).",
        f"- **QA pairs**: {facts.pairs}"
        + (
            f"; the quality checks kept {manifest.pairs_kept} of {judged} judged (acceptance rate {rate:.1%})."
            if rate is not None
            else "."
        ),
    ]
    if manifest.quality_scores:
        lines.append(
            "- **Verdicts**: "
            + manifest.quality_scores.describe()
            + ". Each pair's are in `vqa_provenance.quality.verdicts` (with `rejection` where a check failed, when the run annotated instead of filtering)."
        )
    if manifest.rejections_by_reason:
        lines.append(
            "- **Rejected pairs by reason**: " + ", ".join(f"`{k}` {v}" for k, v in manifest.rejections_by_reason.items()) + "."
        )
    if manifest.failures_by_reason:
        lines.append(
            "- **Failed rows by reason**: " + ", ".join(f"`{k}` {v}" for k, v in manifest.failures_by_reason.items()) + "."
        )
    if facts.labels:
        lines.append("- **Labels**: " + ", ".join(f"`{k}` {v}" for k, v in facts.labels.most_common()) + ".")
    lines += [
        f"- **Input**: `{manifest.input}`",
        f"- **DAG**: `{manifest.dag_id}`" if manifest.dag_id else "",
        f"- **Run**: `{facts.run_id}`" if facts.run_id else "",
        "",
    ]
    lines += [
        "## How it was made",
        "",
        "| stage | generator | model | prompt SHA-256 | rows failed | errors file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, summary in manifest.stages.items():
        errors = f"`{summary.errors}`" if summary.errors else ""
        lines.append(
            f"| {stage} | {summary.generator or summary.kind} | `{summary.model}` | `{(summary.prompt_sha256 or '')[:16]}` | {summary.rows_failed} | {errors} |"
        )
    lines += ["", "## Files", ""]
    if "hf" in uris:
        lines.append(
            f"- `{relative(uris['hf'])}/`: Parquet shards under `data/` with the images embedded and TRL's `messages` (`datasets.load_dataset`, `push_to_hub`)."
        )
    if "sharegpt" in uris:
        lines.append(
            f"- `{relative(uris['sharegpt'])}`, registered in `{relative(uris['dataset_info'])}`: LLaMA-Factory's "
            f"ShareGPT form (`messages` with `images`, or `videos` for frames of one size)."
        )
    if "llava" in uris:
        lines.append(f"- `{relative(uris['llava'])}`: LLaVA's `{{id, image, conversations}}`, one `{IMAGE_TOKEN}` per image.")
    if "parquet" in uris:
        lines.append(f"- `{relative(uris['parquet'])}`: one flat Parquet file with the media's own URIs.")
    if "media" in uris:
        lines.append(
            f"- `{MEDIA_FOLDER}/`: the images (for video, the frames the model was shown), named by their SHA-256; the files above name them by relative path."
        )
    if data_files:
        lines += [
            "",
            "## Load",
            "",
            "```python",
            "from datasets import load_dataset",
            "",
            'ds = load_dataset("<this folder>")["train"]',
            "```",
        ]
    return "\n".join(lines) + "\n"
