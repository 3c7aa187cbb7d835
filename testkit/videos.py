"""Small videos written with PyAV for the tests, the demo and the bench: scenes of flat colour with a moving square, hard cuts between them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (R, G, B) of each scene, in turn
SCENE_COLOURS = [(200, 30, 30), (20, 120, 200), (30, 200, 60), (230, 200, 40), (120, 40, 160), (240, 240, 240)]


def write_video(
    path: Path | str,
    scenes: Sequence[float],
    *,
    fps: int = 10,
    size: tuple[int, int] = (320, 240),
    audio: bool = True,
    codec: str = "libx264",
    container: str | None = None,
    keyframe_every: int | None = None,
    textured: bool = False,
    preset: str | None = None,
) -> Path:
    """``path``: one scene per entry of ``scenes`` (its length in seconds), cut hard from one to the next.

    Each scene is a flat colour with a square sliding across it (so frames within a scene differ a
    little); ``textured``: a photo-like picture panning instead, which costs a decoder what camera
    footage does. ``audio``: a 440 Hz tone, 16 kHz mono AAC, as long as the video. ``preset``:
    libx264's speed preset (``veryfast`` writes long videos sooner).
    """
    import av
    import numpy as np

    path = Path(path)
    width, height = size
    with av.open(str(path), "w", format=container) as out:
        stream: Any = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if keyframe_every:
            stream.codec_context.gop_size = keyframe_every
        if preset:
            stream.options = {"preset": preset}
        sound: Any = out.add_stream("aac", rate=16_000) if audio else None
        index = 0
        side = max(4, height // 6)
        for scene, seconds in enumerate(scenes):
            colour = np.array(SCENE_COLOURS[scene % len(SCENE_COLOURS)], dtype=np.uint8)
            backdrop = None
            if textured:
                from testkit.data import photo

                backdrop = np.asarray(photo((width + 4 * round(seconds * fps), height), seed=scene)) // 2 + colour // 2
            for i in range(round(seconds * fps)):
                if backdrop is not None:
                    picture = np.ascontiguousarray(backdrop[:, 4 * i : 4 * i + width])
                else:
                    picture = np.empty((height, width, 3), dtype=np.uint8)
                    picture[:] = colour
                x = (i * 7) % max(1, width - side)
                picture[height // 2 - side // 2 : height // 2 + side // 2, x : x + side] = 255 - colour
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = index
                index += 1
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            rate = 16_000
            total = round(sum(scenes) * rate)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / rate) * 32767).astype(np.int16)
            for start in range(0, total, 1024):
                chunk = tone[start : start + 1024].reshape(1, -1)
                samples = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
                samples.sample_rate, samples.pts = rate, start
                for packet in sound.encode(samples):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    return path


def write_audio_only(path: Path | str, seconds: float = 1.0) -> Path:
    """An AAC file with sound and no picture."""
    import av
    import numpy as np

    path = Path(path)
    with av.open(str(path), "w") as out:
        sound: Any = out.add_stream("aac", rate=16_000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, round(seconds * 16_000)), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16_000, 0
        for packet in [*sound.encode(frame), *sound.encode()]:
            out.mux(packet)
    return path


def write_unknown_codec(path: Path | str) -> Path:
    """A Matroska file whose video track names a codec FFmpeg does not know (the H.264 codec id renamed)."""
    path = Path(path)
    write_video(path, [1.0], audio=False, container="matroska")
    data = path.read_bytes()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    path.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))
    return path
