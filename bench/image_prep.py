"""Image preparation: 4000x3000 JPEGs to the model's pixel budget, against a naive full decode plus resize.

Both use every core (a thread pool of ``os.cpu_count()``; Pillow releases the GIL while it decodes,
resizes and encodes). The worker's path decodes at a reduced DCT scale (JPEG draft mode, never
below the target size) and resizes from there; the naive path decodes all 12 MP, then resizes.
Also: an image that already fits is sent as it is.

    .venv/bin/python bench/image_prep.py [--images 24]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import Result, print_table, write_photos

from vqa_operators import settings
from vqa_operators.media import JPEG_QUALITY, prepare_image, target_size


def naive(data: bytes) -> str:
    """Full decode, orientation, resize to the same size with the same filter, encode: what the worker avoids."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    img = img.resize(target_size(img.width, img.height, settings.MAX_PIXELS), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def rate(function, datas: list[bytes], threads: int) -> float:
    """Images per second over ``datas`` with ``threads`` threads."""
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(function, datas))
        return len(datas) / (time.perf_counter() - started)


def run(images: int = 24) -> list[Result]:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        big = [(folder / n).read_bytes() for n in write_photos(folder, 8, (4000, 3000), quality=92)]
        fits = [(folder / n).read_bytes() for n in write_photos(folder, 8, (1280, 720))]
    datas = (big * (images // len(big) + 1))[:images]

    def ours(data: bytes) -> str:
        return prepare_image(data, source="x.jpg").data_url

    fast, slow, single = rate(ours, datas, cores), rate(naive, datas, cores), rate(ours, datas, 1)
    as_is = rate(ours, fits * 8, cores)
    return [
        Result(
            "4. image preparation, 4000x3000 -> budget",
            f"{fast:.1f} vs naive {slow:.1f} images/s = {fast / slow:.1f}x",
            ">= 3x",
            fast / slow >= 3,
            f"budget {settings.MAX_PIXELS} px (lands at {target_size(4000, 3000, settings.MAX_PIXELS)}); {cores} threads; one thread: "
            f"{single:.1f} images/s ({fast / single:.2f}x from {cores} cores)",
        ),
        Result(
            "4. image already within the budget (1280x720)",
            f"{as_is:.0f} images/s",
            "sent as is",
            None,
            "no decode, no re-encode: the file's bytes",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()
    print_table(run(args.images))
