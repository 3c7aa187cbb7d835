"""Image preparation: orientation, colour mode, pixel budget, and clear errors for bad files."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.conftest import make_jpeg
from vqa_operators.exceptions import RowError
from vqa_operators.media import prepare_image, target_size


def decode(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_small_image_keeps_its_size() -> None:
    out = prepare_image(make_jpeg((64, 48)), source="a.jpg", max_pixels=10_000)
    assert (out.width, out.height) == (64, 48)
    assert decode(out.data_url).size == (64, 48)


def test_large_image_fits_the_budget_and_keeps_aspect() -> None:
    out = prepare_image(make_jpeg((4000, 3000)), source="big.jpg", max_pixels=120_000)
    assert out.width * out.height <= 120_000
    assert abs(out.width / out.height - 4 / 3) < 0.01
    assert (out.original_width, out.original_height) == (4000, 3000)


def test_exif_orientation_is_applied() -> None:
    # orientation 6 = rotate 90 degrees: a stored 80x40 image displays as 40x80
    out = prepare_image(make_jpeg((80, 40), exif_orientation=6), source="rot.jpg", max_pixels=1_000_000)
    assert (out.width, out.height) == (40, 80)
    assert decode(out.data_url).size == (40, 80)


def test_exif_orientation_with_downscale() -> None:
    out = prepare_image(make_jpeg((2000, 1000), exif_orientation=6), source="rot.jpg", max_pixels=20_000)
    assert out.height > out.width
    assert out.width * out.height <= 20_000


def test_transparent_png_becomes_rgb_on_white() -> None:
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    out = decode(prepare_image(buffer.getvalue(), source="t.png").data_url)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5))[0] > 240


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"", "empty"), (b"not an image at all", "cannot decode"), (make_jpeg((64, 64))[:200], "cannot decode")],
    ids=["zero-bytes", "garbage", "truncated"],
)
def test_bad_images_raise_row_errors(data: bytes, match: str) -> None:
    with pytest.raises(RowError, match=match) as info:
        prepare_image(data, source="bad.jpg")
    assert info.value.reason == "bad_image"


def test_target_size_never_upscales() -> None:
    assert target_size(10, 10, 1000) == (10, 10)
    w, h = target_size(1000, 500, 5000)
    assert w * h <= 5000 and w == 2 * h
