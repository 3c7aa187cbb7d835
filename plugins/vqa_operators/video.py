"""Video files -> clips, frames and audio, with PyAV (FFmpeg): the decoding half of the video ingest.

Plain, synchronous Python: the ingest generator runs it in a worker thread. Two streaming passes,
so no more than a frame (and a frame's thumbnail history of one) is ever held:

1. ``scan``: decode every frame once (FFmpeg's own threads, ``thread_type="AUTO"``), keep each
   frame's timestamp and how much a 64x36 thumbnail of its Y, U and V planes changed from the
   frame before it (read from the decoded planes, without a colour conversion).
2. ``extract``: decode again, seeking past long gaps, and keep only the sampled frames.

``plan_clips`` turns the scan into clips: a scene change (the thumbnail changed by at least
``scene_threshold``) starts a clip, none shorter than ``min_clip_s``; a clip longer than
``max_clip_s`` is split evenly; a video with no scene change is cut every ``clip_s`` seconds.
``clip_frame_indices`` picks frames evenly within each clip. ``audio_wav`` cuts a clip's sound as
16 kHz mono WAV, the input a transcription endpoint (Whisper) takes.

Every problem with the file itself is a RowError with a reason: ``video_not_found``,
``video_unreadable`` (corrupt, truncated or empty), ``no_video_stream`` (audio only),
``unsupported_codec``, ``bad_dimensions`` and ``video_too_long``.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from vqa_operators.exceptions import Reason, RowError

# the thumbnail the scene detector compares (per plane), each point the mean of 2x2 samples:
# small enough to cost little next to the decode, averaged enough that motion is not a cut
THUMB_SIZE = (64, 36)
THUMB_SAMPLES = 2
# 8-bit planar YUV: the planes are read as they are; any other pixel format is converted first
PLANAR_YUV = frozenset(
    {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p", "yuv411p", "yuv410p"}
)
# seek instead of decoding on when the next sampled frame is this far ahead (a keyframe is usually nearer)
SEEK_GAP_S = 4.0
# what a transcription endpoint is sent: Whisper's input
AUDIO_RATE = 16_000


@dataclass(frozen=True)
class ClipRules:
    """How a video is cut and sampled, and what it may be."""

    frames_per_clip: int = 4
    # the mean absolute change of a YUV thumbnail's samples (0-1) that counts as a scene change; 0 turns detection off.
    # Measured on the bench's panning footage: 0.01 within a scene, 0.10 and more at a cut
    scene_threshold: float = 0.07
    min_clip_s: float = 1.0
    max_clip_s: float = 30.0
    # the fixed clip length when no scene change is found (or detection is off)
    clip_s: float = 10.0
    min_side: int = 16
    max_side: int = 8192
    max_duration_s: float = 4 * 3600.0
    # FFmpeg decoding threads; 0: one per core this process may use
    threads: int = 0


@dataclass(frozen=True)
class VideoInfo:
    """What the container says of its first video stream."""

    codec: str
    width: int
    height: int
    duration_s: float | None
    fps: float | None
    has_audio: bool

    def summary(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "width": self.width,
            "height": self.height,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
            "fps": None if self.fps is None else round(self.fps, 3),
            "has_audio": self.has_audio,
        }


@dataclass
class Scan:
    """Pass 1: every frame's timestamp (seconds from the first frame) and its change from the frame before."""

    info: VideoInfo
    times: list[float] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)
    # the stream's timestamps (pts), to find the sampled frames again; None if the stream has none
    pts: list[int] | None = field(default_factory=list)
    end_s: float = 0.0


@dataclass(frozen=True)
class ClipPlan:
    """One clip: its frame range ``[first, last)`` in the scan, its span in seconds and its sampled frames."""

    index: int
    first: int
    last: int
    start_s: float
    end_s: float
    frames: tuple[int, ...]


def decoding_threads(rules: ClipRules) -> int:
    """Threads for FFmpeg's decoder: ``rules.threads``, else every core this process may run on."""
    if rules.threads:
        return rules.threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _open(path: str) -> Any:
    import av

    try:
        return av.open(path, metadata_errors="ignore")
    except FileNotFoundError:
        raise RowError(Reason.VIDEO_NOT_FOUND, f"{path}: no such file") from None
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise RowError(Reason.VIDEO_UNREADABLE, f"cannot open the video: {_ffmpeg_message(exc)}") from None


def _ffmpeg_message(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)[:300]


def _video_stream(container: Any, rules: ClipRules) -> tuple[Any, VideoInfo]:
    """The first video stream, checked (codec, dimensions, duration), set to decode with threads."""
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise RowError(Reason.NO_VIDEO_STREAM, f"the file has no video stream ({', '.join(kinds)})")
    stream = container.streams.video[0]
    context = stream.codec_context
    if context is None:
        raise RowError(Reason.UNSUPPORTED_CODEC, "FFmpeg has no decoder for the video stream's codec")
    width, height = context.width, context.height
    if min(width, height) < rules.min_side or max(width, height) > rules.max_side:
        raise RowError(Reason.BAD_DIMENSIONS, f"{width}x{height}: each side must be {rules.min_side} to {rules.max_side} pixels")
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    if duration is not None and duration > rules.max_duration_s:
        raise RowError(Reason.VIDEO_TOO_LONG, f"{duration:.0f} s; the limit is {rules.max_duration_s:.0f} s (max_video_s)")
    rate = stream.average_rate or stream.guessed_rate
    info = VideoInfo(
        codec=context.name,
        width=width,
        height=height,
        duration_s=duration,
        fps=float(rate) if rate else None,
        has_audio=bool(container.streams.audio),
    )
    stream.thread_type = "AUTO"
    stream.thread_count = decoding_threads(rules)
    return stream, info


def _decode(container: Any, stream: Any, what: str) -> Iterator[Any]:
    """The stream's frames; a decoding failure is the row's ``video_unreadable``."""
    import av

    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:
        raise RowError(Reason.VIDEO_UNREADABLE, f"decoding failed {what}: {_ffmpeg_message(exc)}") from None


def scan(path: str, rules: ClipRules) -> Scan:
    """Pass 1: decode every frame of ``path``; a file with no decodable frame is ``video_unreadable``."""
    import numpy as np

    with _open(path) as container:
        stream, info = _video_stream(container, rules)
        result = Scan(info)
        base = stream.time_base or Fraction(1, 1)
        first: float | None = None
        previous = None
        last_duration = 1 / info.fps if info.fps else 0.0
        for index, frame in enumerate(_decode(container, stream, "while scanning")):
            if frame.pts is None:
                result.pts = None
            elif result.pts is not None:
                result.pts.append(frame.pts)
            at = float(frame.pts * base) if frame.pts is not None else index * last_duration
            if first is None:
                first = at
            result.times.append(at - first)
            if at - first > rules.max_duration_s:  # a container that did not declare its length
                raise RowError(Reason.VIDEO_TOO_LONG, f"over {rules.max_duration_s:.0f} s, the limit (max_video_s)")
            thumb = scene_signature(frame)
            result.changes.append(0.0 if previous is None else float(np.abs(thumb - previous).mean()) / 255)
            previous = thumb
            if frame.duration:
                last_duration = float(frame.duration * base)
        if not result.times:
            raise RowError(Reason.VIDEO_UNREADABLE, "the video stream has no decodable frame")
        result.end_s = result.times[-1] + last_duration
    return result


def scene_signature(frame: Any) -> Any:
    """A frame's Y, U and V planes, each sampled on a 64x36 grid (each point the mean of 2x2 samples), as one float vector."""
    import numpy as np

    width, height = THUMB_SIZE
    k = THUMB_SAMPLES
    if frame.format.name not in PLANAR_YUV:
        frame = frame.reformat(width=width * k, height=height * k, format="yuv420p")
    parts = []
    for plane in frame.planes:
        pixels = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
        rows, cols = height * k, width * k
        sampled = pixels[:: max(1, plane.height // rows), :: max(1, plane.width // cols)][:rows, :cols].astype(np.float32)
        # a plane smaller than the grid is compared point for point
        whole = sampled.shape == (rows, cols)
        sampled = sampled.reshape(height, k, width, k).mean(axis=(1, 3)) if whole else np.resize(sampled, (height, width))
        parts.append(sampled.ravel())
    return np.concatenate(parts)


def plan_clips(result: Scan, rules: ClipRules) -> list[ClipPlan]:
    """Clips over the scanned frames: scene changes, else fixed lengths; within ``[min_clip_s, max_clip_s]`` where the video allows."""
    times, n = result.times, len(result.times)
    starts = [0]
    if rules.scene_threshold > 0:
        for i in range(1, n):
            if result.changes[i] >= rules.scene_threshold and times[i] - times[starts[-1]] >= rules.min_clip_s:
                starts.append(i)
    if len(starts) == 1:  # no scene change: fixed lengths
        starts = _every(times, 0, n, rules.clip_s)
    # the last clip is too short: it joins the one before
    if len(starts) > 1 and result.end_s - times[starts[-1]] < rules.min_clip_s:
        starts.pop()
    # a clip longer than max_clip_s is split into equal parts
    bounds = [*starts, n]
    split: list[int] = []
    for a, b in itertools.pairwise(bounds):
        end = times[b] if b < n else result.end_s
        length = end - times[a]
        parts = max(1, math.ceil(length / rules.max_clip_s - 1e-9))
        split.extend(_every(times, a, b, length / parts) if parts > 1 else [a])
    bounds = [*split, n]
    clips = []
    for index, (a, b) in enumerate(itertools.pairwise(bounds)):
        end = times[b] if b < n else result.end_s
        clips.append(ClipPlan(index, a, b, times[a], end, clip_frame_indices(times, a, b, end, rules.frames_per_clip)))
    return clips


def _every(times: list[float], first: int, last: int, step: float) -> list[int]:
    """The frames in ``[first, last)`` that start a new ``step``-second piece, counting from ``first``'s time."""
    starts, origin = [first], times[first]
    for i in range(first + 1, last):
        if times[i] - origin >= step * len(starts) - 1e-9:
            starts.append(i)
    return starts


def clip_frame_indices(times: list[float], first: int, last: int, end_s: float, count: int) -> tuple[int, ...]:
    """Up to ``count`` frames of ``[first, last)``: the frame showing at the middle of each of ``count`` equal spans.

    A clip with fewer frames than ``count`` gives every frame once.
    """
    start = times[first]
    chosen: list[int] = []
    i = first
    for k in range(count):
        target = start + (k + 0.5) * (end_s - start) / count
        while i + 1 < last and times[i + 1] <= target + 1e-9:
            i += 1
        if not chosen or chosen[-1] != i:
            chosen.append(i)
    return tuple(chosen)


def extract(path: str, result: Scan, wanted: list[int], rules: ClipRules, *, max_pixels: int) -> Iterator[tuple[int, bytes]]:
    """Pass 2: ``(frame index, JPEG bytes)`` for each of ``wanted`` (sorted scan indices), at most ``max_pixels`` each.

    Frames are found again by their timestamp; a stream without timestamps is decoded straight
    through and its frames counted instead.
    """
    from vqa_operators.media import JPEG_QUALITY, target_size

    pts = result.pts
    position = {value: i for i, value in enumerate(pts)} if pts is not None else None
    k = 0
    with _open(path) as container:
        stream, _ = _video_stream(container, rules)
        decoded = 0
        while k < len(wanted):
            seeked = False
            for frame in _decode(container, stream, "while extracting frames"):
                if position is None:
                    index, decoded = decoded, decoded + 1
                else:
                    index = position.get(frame.pts, -1)
                if index < wanted[k]:
                    continue
                if index > wanted[k]:
                    raise RowError(
                        Reason.VIDEO_UNREADABLE, f"frame {wanted[k]} ({result.times[wanted[k]]:.3f} s) did not decode again"
                    )
                image = frame.to_image()
                size = target_size(image.width, image.height, max_pixels)
                if size != image.size:
                    image = image.resize(size, resample=3)  # bicubic, as media.prepare_image
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
                yield index, buffer.getvalue()
                k += 1
                if k == len(wanted):
                    return
                # far ahead: seek to the keyframe before it rather than decode everything between
                if pts is not None and result.times[wanted[k]] - result.times[index] > SEEK_GAP_S:
                    container.seek(pts[wanted[k]], stream=stream, backward=True, any_frame=False)
                    seeked = True
                    break
            if not seeked:
                raise RowError(
                    Reason.VIDEO_UNREADABLE,
                    f"the video ended before frame {wanted[k]} ({result.times[wanted[k]]:.3f} s) decoded again",
                )


def audio_wav(path: str, start_s: float, end_s: float) -> bytes:
    """The sound of ``[start_s, end_s)`` as 16 kHz mono 16-bit WAV; empty (no frames) if the file has no audio stream."""
    import av
    import numpy as np

    with _open(path) as container:
        if not container.streams.audio:
            return b""
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        if start_s > 0 and stream.time_base:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True, any_frame=False)
        buffer = io.BytesIO()
        first = round(start_s * AUDIO_RATE)
        last = round(end_s * AUDIO_RATE)
        with wave.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(AUDIO_RATE)
            written = first
            for frame in _decode(container, stream, "while reading the audio"):
                for piece in resampler.resample(frame):
                    if piece.pts is None or piece.time_base is None:
                        continue
                    at = round(float(piece.pts * piece.time_base) * AUDIO_RATE)
                    samples = piece.to_ndarray().reshape(-1)
                    lo, hi = max(first, at), min(last, at + len(samples))
                    if hi > lo and lo >= written:
                        out.writeframes(samples[lo - at : hi - at].astype(np.int16).tobytes())
                        written = hi
                if written >= last:
                    break
        return buffer.getvalue()
