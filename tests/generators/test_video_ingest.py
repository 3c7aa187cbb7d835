"""Video ingest: clip boundaries, frame counts and timestamps from videos PyAV writes here; bad files; captions and
transcripts; the rows through the three video stages."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from testkit.data import MODEL, read_rows
from testkit.openai_server import OpenAITestServer
from testkit.videos import write_audio_only, write_unknown_codec, write_video
from vqa_operators.exceptions import ConfigError
from vqa_operators.video import ClipRules, decoding_threads, plan_clips, scan
from vqa_operators.worker import JobOptions
from vqa_operators.worker.run_loop import run_job

FPS = 10


def spans(path: Path, **rules: Any) -> list[tuple[float, float]]:
    clips = plan_clips(scan(str(path), ClipRules(**rules)), ClipRules(**rules))
    return [(round(c.start_s, 3), round(c.end_s, 3)) for c in clips]


def shown_at(start: float, end: float, n: int, fps: int = FPS) -> list[float]:
    """The timestamps of the frames on screen at the middle of n equal spans of [start, end) (frames at k / fps)."""
    return [math.floor((start + (k + 0.5) * (end - start) / n) * fps + 1e-6) / fps for k in range(n)]


def test_scene_cuts_are_the_clip_boundaries(tmp_path: Path) -> None:
    video = write_video(tmp_path / "cuts.mp4", [2.0, 3.0, 1.5], fps=FPS)
    assert spans(video) == [(0.0, 2.0), (2.0, 5.0), (5.0, 6.5)]


def test_a_cut_sooner_than_min_clip_s_is_ignored_and_a_long_scene_is_split_evenly(tmp_path: Path) -> None:
    quick = write_video(tmp_path / "quick.mp4", [2.0, 0.5, 2.0], fps=FPS, audio=False)
    assert spans(quick, min_clip_s=1.0) == [(0.0, 2.0), (2.0, 4.5)]
    long = write_video(tmp_path / "long.mp4", [9.0, 2.0], fps=FPS, audio=False)
    assert spans(long, max_clip_s=4.0) == [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0), (9.0, 11.0)]


def test_without_a_scene_change_the_video_is_cut_every_clip_s(tmp_path: Path) -> None:
    one_scene = write_video(tmp_path / "one.mp4", [7.0], fps=FPS, audio=False)
    assert spans(one_scene, clip_s=3.0) == [(0.0, 3.0), (3.0, 6.0), (6.0, 7.0)]
    # a last piece shorter than min_clip_s joins the clip before it
    assert spans(one_scene, clip_s=3.0, min_clip_s=1.5) == [(0.0, 3.0), (3.0, 7.0)]
    # detection off: fixed lengths even across a cut
    cuts = write_video(tmp_path / "cuts.mp4", [2.0, 2.0], fps=FPS, audio=False)
    assert spans(cuts, scene_threshold=0.0, clip_s=3.0) == [(0.0, 3.0), (3.0, 4.0)]


def square_left_edge(jpeg: bytes) -> int:
    """Where the sliding square begins in a frame of ``write_video`` (row 120 of 320x240): it tells which frame this is."""
    with Image.open(io.BytesIO(jpeg)) as image:
        row = [image.convert("RGB").getpixel((x, 120)) for x in range(320)]
    return next(x for x, (r, g, b) in enumerate(row) if g > 150 and b > 150 and r < 100)  # cyan on red


@pytest.mark.parametrize("seek", [True, False])
def test_extraction_finds_the_sampled_frames_whether_it_seeks_or_decodes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seek: bool
) -> None:
    import vqa_operators.video as video

    # one 20 s scene with a keyframe every 3 s: the two sampled frames (5 s and 15 s) are 10 s apart, so the extraction seeks
    path = write_video(tmp_path / "long.mp4", [20.0], fps=FPS, audio=False, keyframe_every=30)
    if not seek:
        monkeypatch.setattr(video, "SEEK_GAP_S", 1e9)
    rules = ClipRules(frames_per_clip=1, clip_s=10.0)
    result = scan(str(path), rules)
    clips = plan_clips(result, rules)
    assert [(c.start_s, c.end_s, c.frames) for c in clips] == [(0.0, 10.0, (50,)), (10.0, 20.0, (150,))]
    decoded = 0
    decode = video._decode

    def counting(*args: Any) -> Any:
        nonlocal decoded
        for frame in decode(*args):
            decoded += 1
            yield frame

    monkeypatch.setattr(video, "_decode", counting)
    frames = list(video.extract(str(path), result, [50, 150], rules, max_pixels=10**6))
    assert [index for index, _ in frames] == [50, 150]
    # seeking skips the frames between (it lands on the keyframe at 15 s); decoding on reads all 151
    assert decoded < 80 if seek else decoded == 151
    # frame i draws its square at x = 7i mod 280: the decoded picture is frame 50's and frame 150's, not a neighbour's
    assert [square_left_edge(data) for _, data in frames] == [
        pytest.approx(7 * 50 % 280, abs=2),
        pytest.approx(7 * 150 % 280, abs=2),
    ]


def test_decoding_uses_every_core_the_process_may_use() -> None:
    assert decoding_threads(ClipRules()) == len(os.sched_getaffinity(0))
    assert decoding_threads(ClipRules(threads=3)) == 3


def ingest_options(server: OpenAITestServer, folder: Path, rows: list[dict[str, Any]], **extra: Any) -> JobOptions:
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings: dict[str, Any] = {
        "generator": "video_ingest",
        "input": str(source),
        "output": str(folder / "run" / "ingest.jsonl"),
        "base_url": server.base_url,
        "model": MODEL,
        "media_root": str(folder / "media"),
        "concurrency": 8,
        "seed": 3,
        "request_timeout": 5.0,
        **extra,
    }
    return JobOptions(**settings)


@pytest.fixture
def media(tmp_path: Path) -> Path:
    (tmp_path / "media").mkdir()
    return tmp_path / "media"


def test_a_video_becomes_clips_with_stored_frames_timestamps_and_captions(
    vlm_server: OpenAITestServer, tmp_path: Path, media: Path
) -> None:
    write_video(media / "ad.mp4", [2.0, 3.0, 1.5], fps=FPS, size=(320, 240))
    opts = ingest_options(
        vlm_server, tmp_path, [{"id": "ad", "video": "ad.mp4", "Meta": "A shoe ad."}], params={"frames_per_clip": 4}
    )
    manifest = run_job(opts)
    assert (manifest.rows_in, manifest.rows_out, manifest.rows_failed) == (1, 1, 0)
    [row] = read_rows(tmp_path / "run" / "ingest.jsonl")
    assert row["id"] == "ad" and row["video"] == "ad.mp4" and row["Meta"] == "A shoe ad."
    clips = row["Clips"]
    assert [(c["Start"], c["End"]) for c in clips] == [(0.0, 2.0), (2.0, 5.0), (5.0, 6.5)]
    for clip in clips:
        assert clip["Frame_Times"] == shown_at(clip["Start"], clip["End"], 4)
        assert len(clip["Frames_Images"]) == 4 and clip["Audio_Text"] == ""  # no transcription endpoint configured
        for uri in clip["Frames_Images"]:
            assert uri.startswith(str(tmp_path / "run" / "ingest.frames") + "/")
            with Image.open(uri) as image:
                assert image.format == "JPEG" and image.size == (320, 240)
    # the frames are the clip's own: each scene is one flat colour (the moving square aside)
    with Image.open(clips[1]["Frames_Images"][0]) as image:
        r, g, b = image.convert("RGB").getpixel((5, 5))
    assert b > 150 and r < 60  # scene 2 is blue
    # one caption request per clip, showing that clip's 4 frames; the answer is its Description
    captions = [b for b in vlm_server.requests if b["response_format"]["json_schema"]["name"] == "ClipCaption"]
    assert len(captions) == 3
    by_clip = {
        int(b["messages"][-1]["content"][-1]["text"].split("Clip ")[1].split(" ")[0]): b for b in captions
    }  # sent concurrently
    for number, clip in enumerate(clips, 1):
        parts = by_clip[number]["messages"][-1]["content"]
        assert sum(p["type"] == "image_url" for p in parts) == 4
        assert f"from {clip['Start']:.1f} s to {clip['End']:.1f} s" in parts[-1]["text"] and "A shoe ad." in parts[-1]["text"]
    assert all(c["Description"] for c in clips) and len({c["Description"] for c in clips}) == 3
    details = row["vqa_provenance"]["video_ingest"]
    assert details["clips"] == 3 and details["scene_changes"] == 2 and details["frames"] == 12
    assert details["video"]["codec"] == "h264" and details["video"]["frames_decoded"] == 65


def test_a_clip_shorter_than_frames_per_clip_gives_each_frame_once_and_captions_can_be_off(
    vlm_server: OpenAITestServer, tmp_path: Path, media: Path
) -> None:
    write_video(media / "short.mp4", [0.4], fps=FPS, audio=False)
    opts = ingest_options(
        vlm_server,
        tmp_path,
        [{"video": "short.mp4"}],
        params={"frames_per_clip": 8, "caption": False, "min_clip_s": 0.1, "clip_s": 1.0},
    )
    run_job(opts)
    [row] = read_rows(tmp_path / "run" / "ingest.jsonl")
    [clip] = row["Clips"]
    assert clip["Frame_Times"] == [0.0, 0.1, 0.2, 0.3] and len(clip["Frames_Images"]) == 4
    assert clip["Description"] == "" and vlm_server.requests == []
    # no Meta given: one is made from the file, and says so
    assert row["Meta"] == "Video file short.mp4: 0.4 s, 320x240, 1 clips."


def test_a_meta_object_is_kept_and_shown_to_the_captioner_as_json(
    vlm_server: OpenAITestServer, tmp_path: Path, media: Path
) -> None:
    write_video(media / "ad.mp4", [1.0], fps=FPS, audio=False)
    meta = {"brand": "Trailco", "length": "1 s"}
    run_job(ingest_options(vlm_server, tmp_path, [{"video": "ad.mp4", "Meta": meta}], params={"clip_s": 1.0}))
    assert read_rows(tmp_path / "run" / "ingest.jsonl")[0]["Meta"] == meta
    [caption] = vlm_server.requests
    assert 'About the video: {"brand": "Trailco", "length": "1 s"}' in caption["messages"][-1]["content"][-1]["text"]


def test_rows_with_clips_already_pass_through_unchanged(vlm_server: OpenAITestServer, tmp_path: Path, media: Path) -> None:
    seed_row = {"id": 1, "Meta": "m", "Clips": [{"Description": "d", "Audio_Text": "a", "Frames_Images": ["f.jpg"]}]}
    run_job(ingest_options(vlm_server, tmp_path, [seed_row]))
    [row] = read_rows(tmp_path / "run" / "ingest.jsonl")
    assert {k: v for k, v in row.items() if k != "vqa_provenance"} == seed_row
    assert vlm_server.requests == []


def test_bad_videos_go_to_errors_with_a_reason_and_every_row_is_accounted_for(
    vlm_server: OpenAITestServer, tmp_path: Path, media: Path
) -> None:
    write_video(media / "good.mp4", [1.0], audio=False)
    (media / "empty.mp4").write_bytes(b"")
    good = (media / "good.mp4").read_bytes()
    (media / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (media / "noise.mp4").write_bytes(os.urandom(4096))
    write_audio_only(media / "speech.m4a")
    write_unknown_codec(media / "unknown.mkv")
    write_video(media / "tiny.mp4", [1.0], size=(8, 8), audio=False)
    write_video(media / "wide.mp4", [1.0], size=(320, 32), audio=False)
    (tmp_path / "outside.mp4").write_bytes(good)
    rows = [
        {"id": "good", "video": "good.mp4"},
        {"id": "empty", "video": "empty.mp4"},
        {"id": "truncated", "video": "truncated.mp4"},
        {"id": "noise", "video": "noise.mp4"},
        {"id": "audio", "video": "speech.m4a"},
        {"id": "codec", "video": "unknown.mkv"},
        {"id": "tiny", "video": "tiny.mp4"},
        {"id": "wide", "video": "wide.mp4"},
        {"id": "missing", "video": "nope.mp4"},
        {"id": "outside", "video": "../outside.mp4"},
        {"id": "both", "video": "good.mp4", "Clips": []},
        {"id": "number", "video": 7},
    ]
    opts = ingest_options(vlm_server, tmp_path, rows, params={"caption": False, "max_side": 300})
    manifest = run_job(opts)
    assert manifest.rows_in == 12 and manifest.rows_out == 0 and manifest.rows_failed == 12  # 320 wide is over max_side 300
    reasons = {e["row"]["id"]: e["reason"] for e in read_rows(tmp_path / "run" / "ingest.errors.jsonl")}
    assert reasons == {
        "good": "bad_dimensions",
        "empty": "video_unreadable",
        "truncated": "video_unreadable",
        "noise": "video_unreadable",
        "audio": "no_video_stream",
        "codec": "unsupported_codec",
        "tiny": "bad_dimensions",
        "wide": "bad_dimensions",
        "missing": "video_not_found",
        "outside": "path_not_allowed",
        "both": "bad_field",
        "number": "bad_field",
    }
    details = {e["row"]["id"]: e["detail"] for e in read_rows(tmp_path / "run" / "ingest.errors.jsonl")}
    assert details["tiny"] == "8x8: each side must be 16 to 300 pixels" and "0 bytes" in details["empty"]
    # within the size limits the same file is fine; over max_video_s it is not
    run_job(ingest_options(vlm_server, tmp_path, rows[:1], params={"caption": False}))
    assert len(read_rows(tmp_path / "run" / "ingest.jsonl")) == 1
    run_job(ingest_options(vlm_server, tmp_path, rows[:1], params={"caption": False, "max_video_s": 0.5}))
    [error] = read_rows(tmp_path / "run" / "ingest.errors.jsonl")
    assert error["reason"] == "video_too_long" and error["detail"] == "1 s; the limit is 0 s (max_video_s)"


def test_audio_text_comes_from_the_transcription_endpoint_when_one_is_configured(
    vlm_server: OpenAITestServer, tmp_path: Path, media: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_video(media / "talk.mp4", [2.0, 3.0], fps=FPS)
    write_video(media / "silent.mp4", [2.0], fps=FPS, audio=False)
    vlm_server.transcription_model = "whisper-test"
    monkeypatch.setenv("VQA_TRANSCRIPTION_URL", vlm_server.base_url)
    monkeypatch.setenv("VQA_TRANSCRIPTION_MODEL", "whisper-test")
    opts = ingest_options(
        vlm_server,
        tmp_path,
        [{"id": "talk", "video": "talk.mp4"}, {"id": "silent", "video": "silent.mp4"}],
        params={"caption": False},
    )
    run_job(opts)
    talk, silent = read_rows(tmp_path / "run" / "ingest.jsonl")
    # each clip's own sound, as 16 kHz WAV: 2 s and 3 s
    assert [c["Audio_Text"] for c in talk["Clips"]] == ["Transcript of 2.00 s of audio.", "Transcript of 3.00 s of audio."]
    assert [c["Audio_Text"] for c in silent["Clips"]] == [""]  # no audio stream: nothing to send
    assert sorted(t["seconds"] for t in vlm_server.transcriptions) == [2.0, 3.0]  # the clips are sent side by side
    assert talk["vqa_provenance"]["video_ingest"]["transcription_model"] == "whisper-test"


def test_transcription_misconfigured_fails_the_run_not_the_rows(
    vlm_server: OpenAITestServer, tmp_path: Path, media: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_video(media / "talk.mp4", [1.0], fps=FPS)
    rows = [{"video": "talk.mp4"}]
    with pytest.raises(ConfigError, match="no transcription endpoint is configured"):
        run_job(ingest_options(vlm_server, tmp_path, rows, params={"transcribe": "on"}))
    # a server whose model is not speech-to-text has no /audio/transcriptions: vLLM answers 404
    monkeypatch.setenv("VQA_TRANSCRIPTION_URL", vlm_server.base_url)
    monkeypatch.setenv("VQA_TRANSCRIPTION_MODEL", MODEL)
    with pytest.raises(
        ConfigError, match=r"has no /audio/transcriptions for 'test-vlm' \(is it serving a speech-to-text model\?\)"
    ):
        run_job(ingest_options(vlm_server, tmp_path, rows, params={"caption": False}))
    # off: the endpoint is not asked
    run_job(ingest_options(vlm_server, tmp_path, rows, params={"caption": False, "transcribe": "off"}))
    assert read_rows(tmp_path / "run" / "ingest.jsonl")[0]["Clips"][0]["Audio_Text"] == ""


def test_the_ingested_rows_run_through_the_three_video_stages(vlm_server: OpenAITestServer, tmp_path: Path, media: Path) -> None:
    write_video(media / "ad.mp4", [2.0, 2.0, 2.0], fps=FPS)
    run_job(
        ingest_options(
            vlm_server, tmp_path, [{"id": "ad", "video": "ad.mp4", "Meta": "A shoe ad."}], params={"frames_per_clip": 2}
        )
    )
    run = tmp_path / "run"
    common = {
        "base_url": vlm_server.base_url,
        "model": MODEL,
        "media_root": str(media),
        "concurrency": 4,
        "seed": 1,
        "max_tokens": 4096,
    }
    # the frames lie in the run's folder, outside the media root: only the run's staging root lets a stage read them
    confined = run_job(
        JobOptions(generator="video_qa_initial", input=str(run / "ingest.jsonl"), output=str(run / "confined.jsonl"), **common)
    )
    assert confined.failures_by_reason == {"path_not_allowed": 1}
    stages = [
        ("video_qa_initial", "ingest", "initial", {}),
        ("video_qa_multiagent", "initial", "multiagent", {"max_iterations": 1}),
        ("video_qa_final", "multiagent", "final", {"final_pairs": 3}),
    ]
    for generator, source, output, params in stages:
        manifest = run_job(
            JobOptions(
                generator=generator,
                input=str(run / f"{source}.jsonl"),
                output=str(run / f"{output}.jsonl"),
                staging_root=str(run),
                params=params,
                **common,
            )
        )
        assert (manifest.rows_out, manifest.rows_failed) == (1, 0), manifest.failures_by_reason
    [row] = read_rows(run / "final.jsonl")
    assert len(row["QA"]) == 3 and all(
        {"Label", "Question", "Answer", "Clips"} == set(p) and all(0 <= c < len(row["Clips"]) for c in p["Clips"])
        for p in row["QA"]
    )
    # the initial request showed the ingested frames, and their captions
    initial = next(b for b in vlm_server.requests if b["response_format"]["json_schema"]["name"] == "VideoQASet")
    shown = [
        p
        for m in initial["messages"]
        for p in (m["content"] if isinstance(m["content"], list) else [])
        if p["type"] == "image_url"
    ]
    assert len(shown) == 6
    assert row["Clips"][0]["Description"] in json.dumps(initial)


def test_videos_and_frames_on_s3(vlm_server: OpenAITestServer, s3, bucket: str, tmp_path: Path) -> None:
    video = write_video(tmp_path / "ad.mp4", [1.5, 1.5], fps=FPS)
    s3.upload_file(str(video), bucket, "raw/ad.mp4")
    source = tmp_path / "in.jsonl"
    # the bucket itself is allowed, so a URI naming no object gets past confinement: it is a bad field, not a failed run
    rows = [{"video": "ad.mp4"}, {"video": "gone.mp4"}, {"video": f"s3://{bucket}"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = f"s3://{bucket}/out/run-1/ingest/shard-00000.jsonl"
    manifest = run_job(
        JobOptions(
            generator="video_ingest",
            input=str(source),
            output=out,
            base_url=vlm_server.base_url,
            model=MODEL,
            media_root=f"s3://{bucket}/raw/",
            allowed_media_roots=[f"s3://{bucket}"],
            params={"frames_per_clip": 2, "caption": False},
        )
    )
    assert (manifest.rows_out, manifest.failures_by_reason) == (1, {"bad_field": 1, "video_not_found": 1})
    row = json.loads(s3.get_object(Bucket=bucket, Key="out/run-1/ingest/shard-00000.jsonl")["Body"].read())
    frames = [uri for clip in row["Clips"] for uri in clip["Frames_Images"]]
    assert len(frames) == 4 and all(uri.startswith(f"s3://{bucket}/out/run-1/ingest/shard-00000.frames/") for uri in frames)
    for uri in frames:
        obj = s3.get_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"))
        assert obj["ContentType"] == "image/jpeg" and Image.open(io.BytesIO(obj["Body"].read())).size == (320, 240)
