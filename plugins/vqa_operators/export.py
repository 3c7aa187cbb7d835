"""Training-ready copies of a run's dataset, written beside its JSONL: Parquet, LLaVA-style conversations, a dataset card.

One pass over the merged output, streaming (a batch of rows in memory at a time):

- **Parquet** (``<output name>.parquet``), which Hugging Face ``datasets`` loads with
  ``load_dataset("parquet", data_files=...)``: ``id``, ``images`` (the media as absolute URIs, or
  with ``embed_images`` the bytes too, as ``datasets``' ``Image`` feature), ``qa`` (``question``,
  ``answer``, ``labels``), ``conversations`` (as below), ``meta`` (video: ``Meta``) and ``dataset`` (the DAG's id).
- **LLaVA** (``<output name>.llava.json``): a JSON array of ``{"id", "image", "conversations"}``;
  ``image`` is one path or a list, the first human turn starts with one ``<image>`` line per
  image, and each pair is a human turn and a gpt turn, so a row with several pairs is a
  multi-turn conversation and a pers_qa row one turn. Video rows use the frames the model was
  shown (``frames_sent``), else every frame of every clip.
- **A dataset card** (``README.md`` in the run's folder): counts, acceptance rate and rejection
  reasons, each stage's model and prompt hash, the label distribution (video), the input, the
  run, the files and how to load them.

Plain Python: it knows nothing of Airflow.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from vqa_operators.exceptions import ConfigError, ExportError, RowError
from vqa_operators.generators import row_output_fields
from vqa_operators.media import MediaReader
from vqa_operators.preview import describe_row
from vqa_operators.storage import Storage, read_jsonl
from vqa_operators.storage.uris import beside

Format = Literal["parquet", "llava"]
FORMATS: tuple[Format, ...] = ("parquet", "llava")
IMAGE_TOKEN = "<image>"  # noqa: S105 - a placeholder, not a secret
# rows per Parquet row group (and per write)
BATCH_ROWS = 512
CARD_NAME = "README.md"


class ExportSettings(BaseModel):
    """What ``merge`` exports (the DAG params ``export_formats`` and ``embed_images``)."""

    formats: list[Format] = Field(default_factory=lambda: list(FORMATS))
    embed_images: bool = False

    @field_validator("formats", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value


def _features(embed_images: bool) -> dict[str, Any]:
    """The Parquet file's ``datasets`` features (its ``huggingface`` schema metadata)."""
    text = {"dtype": "string", "_type": "Value"}
    image = {"_type": "Image"} if embed_images else text
    return {
        "id": text,
        "images": {"feature": image, "_type": "List"},
        "qa": {"feature": {"question": text, "answer": text, "labels": {"feature": text, "_type": "List"}}, "_type": "List"},
        "conversations": {"feature": {"from": text, "value": text}, "_type": "List"},
        "meta": text,
        "dataset": text,
    }


def parquet_schema(embed_images: bool) -> Any:
    """The Parquet schema, with the ``datasets`` features in its metadata so that ``images`` load as images when embedded."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if embed_images else pa.string()
    fields = [
        ("id", pa.string()),
        ("images", pa.list_(image)),
        ("qa", pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string()), ("labels", pa.list_(pa.string()))]))),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("meta", pa.string()),
        ("dataset", pa.string()),
    ]
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": _features(embed_images)}})})


def conversation(images: int, qa: list[dict[str, Any]]) -> list[dict[str, str]]:
    """LLaVA turns: one ``<image>`` line per image before the first question, then question (human) and answer (gpt) per pair."""
    turns = []
    for k, pair in enumerate(qa):
        prefix = f"{IMAGE_TOKEN}\n" * images if k == 0 else ""
        turns += [{"from": "human", "value": prefix + pair["question"]}, {"from": "gpt", "value": pair["answer"]}]
    return turns


def examples(storage: Storage, manifest: dict[str, Any], reader: MediaReader, dataset: str) -> Iterator[dict[str, Any]]:
    """One training example per output row: its id, media URIs, QA, turns, meta and the dataset it belongs to."""
    for n, row in read_jsonl(storage.iter_lines(manifest["output"])):
        if not isinstance(row, dict):
            raise ExportError(f"{manifest['output']} line {n} is not a JSON object: the merged output is damaged")
        fields = row_output_fields(manifest["generator"], row)
        shown = describe_row(fields, n, row)
        try:
            images = [reader.resolve(path) for path in shown["paths"]]
        except RowError as err:
            raise ExportError(f"{manifest['output']} line {n}: {err.detail}") from None
        qa = [{"question": p["question"], "answer": p["answer"], "labels": p["labels"]} for p in shown["qa"]]
        meta = row.get(fields.meta) if fields.meta else None
        yield {
            "id": str(row["id"]) if "id" in row else f"line-{n}",
            "images": images,
            "qa": qa,
            "conversations": conversation(len(images), qa),
            "meta": meta if isinstance(meta, str) else None,
            "dataset": dataset,
        }


def _image_bytes(storage: Storage, uri: str, row_id: str) -> bytes:
    """An image to embed; a clear error if it has gone since the row was generated."""
    try:
        return storage.read_bytes(uri)
    except OSError as exc:
        raise ExportError(f"cannot embed {uri} (row {row_id}): {exc.strerror or exc}") from None


def export_run(
    storage: Storage,
    manifest: dict[str, Any],
    *,
    formats: list[str],
    embed_images: bool = False,
    media_root: str = ".",
    allowed_roots: list[str] | None = None,
    dataset: str = "",
    run_id: str = "",
) -> dict[str, str]:
    """Write ``formats`` and the card beside ``manifest["output"]``; return their URIs by format (and ``card``)."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown export formats {unknown}; choose from {list(FORMATS)}")
    output = manifest["output"]
    uris: dict[str, str] = {name: beside(output, ".parquet" if name == "parquet" else ".llava.json") for name in FORMATS if name in formats}
    reader = MediaReader(storage, media_root=media_root, allowed_roots=allowed_roots)
    rows, pairs, labels = 0, 0, Counter[str]()
    with contextlib.ExitStack() as stack:
        parquet = llava = None
        if "parquet" in uris:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = parquet_schema(embed_images)
            parquet = stack.enter_context(pq.ParquetWriter(stack.enter_context(storage.open_atomic(uris["parquet"])), schema, compression="zstd"))
        if "llava" in uris:
            llava = stack.enter_context(storage.open_atomic(uris["llava"], content_type="application/json"))
            llava.write(b"[")
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            if parquet is not None and batch:
                if embed_images:
                    for example in batch:
                        example["images"] = [{"bytes": _image_bytes(storage, uri, example["id"]), "path": uri} for uri in example["images"]]
                parquet.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch.clear()

        for example in examples(storage, manifest, reader, dataset or manifest["generator"]):
            if llava is not None:
                image: str | list[str] = example["images"][0] if len(example["images"]) == 1 else example["images"]
                item = {"id": example["id"], "image": image, "conversations": example["conversations"]}
                llava.write(b"\n" if rows == 0 else b",\n")
                llava.write(json.dumps(item, ensure_ascii=False).encode("utf-8"))
            rows += 1
            pairs += len(example["qa"])
            labels.update(label for pair in example["qa"] for label in pair["labels"])
            batch.append(example)
            if len(batch) >= BATCH_ROWS:
                flush()
        flush()
        if llava is not None:
            llava.write(b"\n]\n")
    if rows != manifest["rows_out"]:
        raise ExportError(f"exported {rows} rows but the manifest counts {manifest['rows_out']} rows out")
    card = output.rsplit("/", 1)[0] + "/" + CARD_NAME
    with storage.open_atomic(card, content_type="text/markdown; charset=utf-8") as handle:
        handle.write(dataset_card(manifest, uris, pairs=pairs, labels=labels, dataset=dataset, run_id=run_id, embed_images=embed_images).encode("utf-8"))
    return {**uris, "card": card}


def dataset_card(manifest: dict[str, Any], uris: dict[str, str], *, pairs: int, labels: Counter[str], dataset: str, run_id: str, embed_images: bool) -> str:
    """The card: what the dataset holds, how it was made and judged, and how to load it."""
    name = lambda uri: uri.rsplit("/", 1)[-1]  # noqa: E731 - files sit beside the card
    lines = ["---", "task_categories:", "- visual-question-answering"]
    if "parquet" in uris:
        lines += ["configs:", "- config_name: default", f"  data_files: {name(uris['parquet'])}"]
    lines += ["---", "", f"# {dataset or manifest['generator']} · {run_id}".rstrip(" ·"), ""]
    rate = manifest.get("acceptance_rate")
    lines += [
        f"- **Rows**: {manifest['rows_out']} in the dataset, of {manifest['rows_in']} input rows "
        f"({manifest['rows_failed']} failed, {manifest.get('rows_rejected', 0)} rejected by the quality checks).",
        f"- **QA pairs**: {pairs}" + (f"; the quality checks kept {manifest['pairs_kept']} of {manifest['pairs_kept'] + manifest['pairs_rejected']} judged (acceptance rate {rate:.1%})." if rate is not None else "."),
    ]
    if manifest.get("rejections_by_reason"):
        lines.append("- **Rejected pairs by reason**: " + ", ".join(f"`{k}` {v}" for k, v in manifest["rejections_by_reason"].items()) + ".")
    if manifest.get("failures_by_reason"):
        lines.append("- **Failed rows by reason**: " + ", ".join(f"`{k}` {v}" for k, v in manifest["failures_by_reason"].items()) + ".")
    if labels:
        lines.append("- **Labels**: " + ", ".join(f"`{k}` {v}" for k, v in labels.most_common()) + ".")
    lines += [f"- **Input**: `{manifest['input']}`", f"- **Run**: `{run_id}`" if run_id else "", ""]
    lines += ["## How it was made", "", "| stage | model | prompt SHA-256 |", "| --- | --- | --- |"]
    for stage, summary in (manifest.get("stages") or {}).items():
        lines.append(f"| {stage} | `{summary.get('model')}` | `{str(summary.get('prompt_sha256') or '')[:16]}` |")
    lines += ["", "## Files", ""]
    lines.append(f"- `{name(manifest['output'])}`: the rows as generated, with their provenance (`vqa_provenance`).")
    if "parquet" in uris:
        what = "embedded (the `Image` feature)" if embed_images else "as URIs"
        lines.append(f"- `{name(uris['parquet'])}`: `id`, `images` ({what}), `qa`, `conversations`, `meta`, `dataset`.")
    if "llava" in uris:
        lines.append(f"- `{name(uris['llava'])}`: LLaVA-style `{{id, image, conversations}}`, one `{IMAGE_TOKEN}` per image.")
    lines.append(f"- `{name(manifest['errors'])}` and `{name(manifest['rejected'])}`: what did not make it, and why." if manifest.get("rejected") else f"- `{name(manifest['errors'])}`: rows that failed, and why.")
    if "parquet" in uris:
        lines += ["", "## Load", "", "```python", "from datasets import load_dataset", "", f'ds = load_dataset("parquet", data_files="{uris["parquet"]}")["train"]', "```"]
        if uris["parquet"].startswith("s3://"):
            lines += ["", "(`datasets` reads `s3://` through `s3fs`; or copy the file and load it from disk.)"]
    return "\n".join(lines) + "\n"
