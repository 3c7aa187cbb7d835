"""Image preparation: orientation, colour mode, pixel budget, and clear errors for bad files."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from testkit.data import make_jpeg, photo
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


def psnr(a: Image.Image, b: Image.Image) -> float:
    import math

    from PIL import ImageChops, ImageStat

    mse = sum(v**2 for v in ImageStat.Stat(ImageChops.difference(a, b)).rms) / 3
    return 10 * math.log10(255**2 / mse) if mse else float("inf")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_upright_rgb_image_within_the_budget_is_sent_as_it_is(fmt: str) -> None:
    buffer = io.BytesIO()
    photo((300, 200)).save(buffer, format=fmt)
    data = buffer.getvalue()
    out = prepare_image(data, source=f"a.{fmt.lower()}", max_pixels=300 * 200)
    assert out.data_url == f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()  # the very bytes
    assert (out.width, out.height) == (300, 200)


@pytest.mark.parametrize(
    "variant",
    ["rotated", "grayscale", "over-budget"],
)
def test_an_image_with_something_to_fix_is_re_encoded(variant: str) -> None:
    img, extra, budget = photo((300, 200)), {}, 300 * 200
    if variant == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 8
        extra["exif"] = exif
    elif variant == "grayscale":
        img = img.convert("L")
    else:
        budget = 300 * 200 - 1
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", **extra)
    out = prepare_image(buffer.getvalue(), source="a.jpg", max_pixels=budget)
    sent = decode(out.data_url)
    assert sent.mode == "RGB" and sent.size == (out.width, out.height)
    assert sent.size == {"rotated": (200, 300), "grayscale": (300, 200), "over-budget": target_size(300, 200, budget)}[variant]


def test_reduced_decoding_keeps_the_budget_and_the_quality() -> None:
    """A 4000x3000 photo decoded at 1/2 DCT scale lands at exactly the budget, as close to a full decode as JPEG allows."""
    buffer = io.BytesIO()
    photo((4000, 3000)).save(buffer, format="JPEG", quality=92)
    data = buffer.getvalue()
    out = prepare_image(data, source="big.jpg")
    assert (out.width, out.height) == target_size(4000, 3000, 1280 * 28 * 28)  # not smaller than the budget allows
    # what a full decode would send: same resize, same encoding. Measured: 37.5 dB; decoding at 1/4
    # scale (below the budget) and enlarging would score 31.1 dB, at 1/8 24.1 dB
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((out.width, out.height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    full.save(buffer, format="JPEG", quality=90)
    assert psnr(decode(out.data_url).convert("RGB"), Image.open(buffer).convert("RGB")) > 35
