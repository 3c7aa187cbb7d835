"""Video ingest: frames extracted per second, against the wall time of one full decode of the same file.

The ingest decodes a video twice: a scan of every frame (timestamps and a 64x36 thumbnail's change,
for the scene cuts) and an extraction that seeks to the sampled frames and encodes them as JPEG
at the pixel budget. A full decode is the floor any frame-accurate scene detection pays; the
ingest's floor is two. The video is camera-like for a decoder: a photo-like picture panning. Both use
FFmpeg's threads (one per core); the single-thread decode says what those threads bring.

    .venv/bin/python bench/video_ingest.py [--seconds 40] [--width 1280 --height 720] [--fps 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import Result, print_table

from testkit.videos import write_video
from vqa_operators import settings
from vqa_operators.video import ClipRules, decoding_threads, extract, plan_clips, scan


def full_decode(path: str, threads: int) -> tuple[float, int]:
    """Seconds to decode every frame (no conversion), and the frames decoded."""
    import av

    started = time.perf_counter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        frames = sum(1 for _ in container.decode(stream))
    return time.perf_counter() - started, frames


def ingest(path: str, rules: ClipRules) -> tuple[float, float, int, int]:
    """(scan seconds, extraction seconds, clips, frames extracted): what the ingest does to a file, less the model and the upload."""
    started = time.perf_counter()
    result = scan(path, rules)
    clips = plan_clips(result, rules)
    scanned = time.perf_counter()
    wanted = sorted(i for clip in clips for i in clip.frames)
    extracted = sum(1 for _ in extract(path, result, wanted, rules, max_pixels=settings.MAX_PIXELS))
    return scanned - started, time.perf_counter() - scanned, len(clips), extracted


def run(seconds: float = 40.0, width: int = 1280, height: int = 720, fps: int = 30) -> list[Result]:
    rules = ClipRules(frames_per_clip=4)
    cores = decoding_threads(rules)
    with tempfile.TemporaryDirectory() as tmp:
        scenes = [5.0] * int(seconds // 5)
        path = str(
            write_video(
                Path(tmp) / "bench.mp4", scenes, fps=fps, size=(width, height), audio=False, textured=True, preset="veryfast"
            )
        )
        size_mb = os.path.getsize(path) / 1e6
        full_decode(path, cores)  # warm the page cache and FFmpeg's code
        decode_s, frames = full_decode(path, cores)
        single_s, _ = full_decode(path, 1)
        scan_s, extract_s, clips, extracted = ingest(path, rules)
    total = scan_s + extract_s
    ratio = total / decode_s
    return [
        Result(
            # two decodes by design (the clips' ends must be known before their frames are chosen), so 2x is the floor
            "11. video ingest vs one full decode",
            f"{total:.2f} s vs {decode_s:.2f} s = {ratio:.2f}x",
            "reported (floor 2x)",
            None,
            f"{seconds:g} s of {width}x{height} H.264 at {fps} fps ({frames} frames, {size_mb:.1f} MB, {len(scenes)} scenes -> {clips} clips); "
            f"scan {scan_s:.2f} s, extraction {extract_s:.2f} s; {extracted / total:.1f} frames extracted/s ({extracted} frames)",
        ),
        Result(
            "11. decoding threads",
            f"{single_s / decode_s:.2f}x from {cores} threads",
            "uses every core",
            None,
            f"full decode {decode_s:.2f} s with {cores} threads, {single_s:.2f} s with 1 ({frames / decode_s:.0f} vs {frames / single_s:.0f} frames/s decoded)",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    args = parser.parse_args()
    print_table(run(args.seconds, args.width, args.height, args.fps))
