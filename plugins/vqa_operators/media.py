"""The one image encoder: read bytes, respect EXIF orientation, fit a pixel budget, emit a data URL."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import warnings
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from vqa_operators import settings
from vqa_operators.exceptions import Reason, RowError
from vqa_operators.storage.uris import Storage, join_uri, within

JPEG_QUALITY = 90


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for a chat request, with the sizes that were read and sent."""

    source: str
    data_url: str
    width: int
    height: int
    original_width: int
    original_height: int

    def summary(self) -> dict[str, object]:
        """What was sent, for provenance (no pixels)."""
        return {"source": self.source, "sent": [self.width, self.height], "original": [self.original_width, self.original_height]}


def target_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most ``max_pixels`` pixels (never upscales)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def prepare_image(data: bytes, *, source: str, max_pixels: int = settings.MAX_PIXELS) -> PreparedImage:
    """Fit ``data`` to ``max_pixels`` as an RGB JPEG data URL, upright by its EXIF orientation.

    Three paths, cheapest first:

    - an RGB JPEG or PNG that already fits, upright, is sent as it is (no decode, no re-encode);
    - a JPEG larger than the budget is decoded at a reduced DCT scale (``draft``: 1/2, 1/4 or
      1/8, never below the target size), then resized to exactly the budget;
    - anything else is decoded in full, flattened onto white if transparent, and resized.

    Resizing is bicubic, as the Qwen2-VL and LLaVA image processors do. Raises RowError
    ("bad_image", ...) for anything Pillow cannot read, including decompression bombs.
    """
    from PIL import Image, ImageOps

    if not data:
        raise RowError(Reason.BAD_IMAGE, f"{source}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))  # reads the header only
            original = img.size
            orientation = img.getexif().get(0x0112, 1)
            swaps = orientation in (5, 6, 7, 8)
            display_w, display_h = (original[1], original[0]) if swaps else original
            tw, th = target_size(display_w, display_h, max_pixels)
            if _sendable_as_is(img, data, orientation, (tw, th) == original):
                return _prepared(source, data, (img.format or "jpeg").lower(), original, original)
            if img.format == "JPEG" and (tw, th) != (display_w, display_h):
                img.draft("RGB", (th, tw) if swaps else (tw, th))
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            elif img.mode != "RGB":
                img = img.convert("RGB")
            if img.size != (tw, th):
                img = img.resize((tw, th), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    except RowError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RowError(Reason.BAD_IMAGE, f"{source}: image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise RowError(Reason.BAD_IMAGE, f"{source}: cannot decode image ({exc})") from None
    return _prepared(source, buffer.getvalue(), "jpeg", img.size, (display_w, display_h))


def _sendable_as_is(img: Any, data: bytes, orientation: int, fits: bool) -> bool:
    """True for an RGB JPEG or opaque RGB PNG within the budget and upright: nothing to fix.

    A JPEG must also end with its end-of-image marker; a cut-off file goes through the decoder,
    which names the fault (``bad_image``) instead of the model server rejecting the request.
    """
    if not fits or orientation != 1 or img.mode != "RGB":
        return False
    if img.format == "JPEG":
        return data.endswith(b"\xff\xd9")
    return img.format == "PNG" and "transparency" not in img.info


def _prepared(source: str, data: bytes, subtype: str, sent: tuple[int, int], original: tuple[int, int]) -> PreparedImage:
    encoded = base64.b64encode(data).decode("ascii")
    return PreparedImage(
        source=source,
        data_url=f"data:image/{subtype};base64,{encoded}",
        width=sent[0],
        height=sent[1],
        original_width=original[0],
        original_height=original[1],
    )


def readable_roots(media_root: str, allowed: list[str] | None, staging_root: str | None = None) -> list[str]:
    """Where rows may read media from: the allowed roots (default: the media root itself), and the run's staging
    folder, where an earlier task of the run wrote media (the video ingest's frames)."""
    return [*(allowed or [media_root]), *([staging_root] if staging_root else [])]


class MediaReader:
    """Resolve image paths against a media root, read them (local or S3) and prepare them off the event loop.

    Only paths inside ``allowed_roots`` (default: the media root itself) are read: a row cannot
    reach ``../`` or an absolute path elsewhere (``path_not_allowed``). ``confined=False`` reads any
    path (the seeds' API, in the user's own process on the user's own files).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        media_root: str = ".",
        max_pixels: int = settings.MAX_PIXELS,
        executor: Executor | None = None,
        allowed_roots: list[str] | None = None,
        confined: bool = True,
    ) -> None:
        self.storage = storage
        self.media_root = media_root
        self.max_pixels = max_pixels
        self.executor = executor
        self.allowed_roots = allowed_roots or [media_root]
        self.confined = confined

    def resolve(self, path: str) -> str:
        """The URI of a row's media ``path``; a RowError if it lies outside every allowed root."""
        uri = join_uri(self.media_root, path)
        if self.confined and not any(within(uri, root) for root in self.allowed_roots):
            raise RowError(Reason.PATH_NOT_ALLOWED, f"{path}: outside the allowed media roots")
        return uri

    def _load(self, path: str, max_pixels: int) -> PreparedImage:
        uri = self.resolve(path)
        try:
            data = self.storage.read_bytes(uri)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise RowError(Reason.IMAGE_NOT_FOUND, f"{path}: {exc.strerror or 'no such file'}") from None
        except OSError as exc:
            raise RowError(Reason.IMAGE_UNREADABLE, f"{path}: {exc.strerror or exc}") from None
        except ValueError as exc:  # a malformed s3:// URI in the row
            raise RowError(Reason.BAD_FIELD, f"{path}: {exc}") from None
        return prepare_image(data, source=path, max_pixels=max_pixels)

    async def prepare(self, paths: list[str], *, max_pixels: int | None = None) -> list[PreparedImage]:
        """Read and prepare every image of one row concurrently, in the executor's threads.

        ``max_pixels`` lowers the reader's pixel budget for this call (video frames use less).
        """
        budget = min(max_pixels, self.max_pixels) if max_pixels else self.max_pixels
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self.executor, self._load, p, budget) for p in paths)))
