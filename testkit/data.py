"""Sample data for the tests and the benchmarks: JPEGs, photo-like images, image_qa rows, worker options."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from PIL import Image

    from testkit.openai_server import OpenAITestServer
    from vqa_operators.worker import JobOptions

# the model name the simulated server serves
MODEL = "test-vlm"


def make_jpeg(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30), exif_orientation: int | None = None
) -> bytes:
    """A small JPEG, optionally with an EXIF orientation tag."""
    from PIL import Image

    img = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    if exif_orientation is None:
        img.save(buffer, format="JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields (random) crossed by sharp-edged squares."""
    from PIL import Image, ImageDraw

    w, h = size
    blobs = (max(1, w // 40), max(1, h // 40))
    img = Image.merge(
        "RGB", [Image.effect_noise(blobs, 50 + 10 * ((i + seed) % 5)).resize(size, Image.Resampling.BICUBIC) for i in range(3)]
    )
    draw = ImageDraw.Draw(img)
    step = max(2, w // 170)
    for x in range(0, w, 2 * step):
        for y in range(0, h, 2 * step):
            draw.rectangle((x, y, x + step - 1, y + step - 1), fill=(20, 20, 20))
    return img


def write_image_rows(folder: Path, n: int) -> Path:
    """``folder/in.jsonl``: ``n`` image_qa rows (ids 0..n-1) over two small images in ``folder/media``."""
    media = folder / "media"
    media.mkdir(exist_ok=True)
    (media / "a.jpg").write_bytes(make_jpeg((64, 48)))
    (media / "b.jpg").write_bytes(make_jpeg((48, 64), color=(20, 120, 200)))
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "image": "a.jpg" if i % 2 else ["a.jpg", "b.jpg"]}) + "\n" for i in range(n)))
    return source


def row_seeds(source: Path, seed: int) -> dict[int, int]:
    """The per-row request seed of each row of ``source`` (by its ``id``), as a worker run with ``seed`` derives it: a test tells rows' requests apart by it."""
    from vqa_operators.generators.base import derive_seed, row_key

    rows = [json.loads(line) for line in source.read_text().splitlines()]
    return {row["id"]: cast(int, derive_seed(seed, row_key(row))) for row in rows}


def read_rows(path: Path) -> list[dict]:
    """The rows of a local JSONL file (which must exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def job_options(server: OpenAITestServer, folder: Path, source: Path, **extra: object) -> JobOptions:
    """A worker run of image_qa over ``source`` into ``folder/out/rows.jsonl``; ``extra`` overrides any option."""
    from vqa_operators.worker import JobOptions

    settings: dict[str, Any] = {
        "generator": "image_qa",
        "input": str(source),
        "output": str(folder / "out" / "rows.jsonl"),
        "base_url": server.base_url,
        "model": MODEL,
        "media_root": str(folder / "media"),
        "concurrency": 8,
        "seed": 3,
        "params": {"pairs_per_row": 2},
        "max_retries": 6,
        "request_timeout": 1.0,
        **extra,
    }
    return JobOptions(**settings)
