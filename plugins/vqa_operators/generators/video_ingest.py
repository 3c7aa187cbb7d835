"""Video ingest: rows naming a video file become rows in the seeds' video input format (``Meta`` + ``Clips``).

A row ``{"video": "<path or s3:// URI>", "Meta": "...", ...}`` is decoded with PyAV
(``vqa_operators.video``): cut into clips at scene changes (fixed lengths if there are none),
``frames_per_clip`` frames sampled evenly within each clip and stored as JPEG beside the run's
output (``<output name>.frames/<row key>/clip-000/frame-00.jpg``), each with its timestamp. Each
clip is then given

- ``Description``: a short caption from the run's VLM, shown the clip's frames (``caption``);
- ``Audio_Text``: the clip's speech from the transcription endpoint (``VQA_TRANSCRIPTION_URL``,
  an OpenAI-compatible ``/v1/audio/transcriptions`` such as vLLM serving Whisper), when one is
  configured (``transcribe``); else it is empty.

and ``Start``, ``End`` and ``Frame_Times`` (seconds). A row that already holds ``Clips`` and no
video passes through unchanged, so one input may mix both. Decoding runs in the run's media
threads; FFmpeg decodes each video with one thread per core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError, Reason, RowError
from vqa_operators.generators.answers import STRICT, bounded_text
from vqa_operators.generators.base import CLIP_FRAMES, Generator, GeneratorOptions, OutputFields, origin_key
from vqa_operators.media import PreparedImage, prepare_image
from vqa_operators.storage.uris import beside, is_s3
from vqa_operators.video import ClipPlan, ClipRules, Scan, audio_wav, extract, plan_clips, scan

FRAMES_SUFFIX = ".frames"


class VideoIngestOptions(GeneratorOptions):
    """How videos are cut, sampled and described."""

    video_key: str = Field("video", min_length=1, description="input field with the video's path or s3:// URI")
    meta_key: str = Field(
        "Meta", min_length=1, description="input field with the video's meta text (kept; made from the file if absent)"
    )
    clips_key: str = Field(
        "Clips", min_length=1, description="the clips field written (a row that has one and no video passes through)"
    )
    frames_per_clip: int = Field(
        ClipRules.frames_per_clip,
        ge=1,
        le=64,
        title="Frames per clip",
        description="Video files: frames sampled evenly within each clip and stored as JPEG under the run's folder, each with its timestamp.",
    )
    scene_threshold: float = Field(
        ClipRules.scene_threshold,
        ge=0.0,
        le=1.0,
        title="Scene-change threshold",
        description=(
            "How much the picture must change from one frame to the next (0-1, mean pixel change of a small "
            "thumbnail) to start a new clip. 0: cut every clip_s seconds."
        ),
    )
    min_clip_s: float = Field(
        ClipRules.min_clip_s,
        gt=0,
        le=3600,
        title="Shortest clip (s)",
        description="A scene change sooner than this after the clip began is ignored.",
    )
    max_clip_s: float = Field(
        ClipRules.max_clip_s, gt=0, le=3600, title="Longest clip (s)", description="A longer scene is split into equal clips."
    )
    clip_s: float = Field(
        ClipRules.clip_s,
        gt=0,
        le=3600,
        title="Fixed clip length (s)",
        description="A video with no scene change (or a threshold of 0) is cut into clips this long.",
    )
    max_video_s: float = Field(
        ClipRules.max_duration_s, gt=0, le=86_400, description="longer videos go to errors (video_too_long)"
    )
    max_side: int = Field(
        ClipRules.max_side, ge=16, le=65_536, description="a picture side above this many pixels goes to errors (bad_dimensions)"
    )
    caption: bool = Field(
        True,
        title="Caption each clip",
        description="Ask the model for each clip's Description from its frames (1 request per clip). Off: empty.",
    )
    transcribe: Literal["auto", "on", "off"] = Field(
        "auto",
        title="Transcribe each clip",
        description=(
            "Audio_Text from the speech-to-text endpoint VQA_TRANSCRIPTION_URL (vLLM serving Whisper): auto uses it if set, else leaves "
            "Audio_Text empty; on fails the run if none is set."
        ),
    )
    max_caption_chars: int = Field(300, ge=20, le=2000, description="longest Description: the caption schema's bound")
    frames_prefix: str | None = Field(None, description="where the frames go (default: beside the output, <output name>.frames/)")
    video_concurrency: int = Field(
        16,
        ge=1,
        le=1024,
        description="videos decoded and captioned at once: each holds its sampled frames until its captions come back",
    )

    @model_validator(mode="after")
    def _lengths(self) -> VideoIngestOptions:
        if self.min_clip_s > self.max_clip_s:
            raise ValueError(f"min_clip_s ({self.min_clip_s}) is above max_clip_s ({self.max_clip_s})")
        if not self.min_clip_s <= self.clip_s <= self.max_clip_s:
            raise ValueError(
                f"clip_s ({self.clip_s}) must lie within min_clip_s and max_clip_s ({self.min_clip_s}-{self.max_clip_s})"
            )
        return self

    @property
    def rules(self) -> ClipRules:
        return ClipRules(
            frames_per_clip=self.frames_per_clip,
            scene_threshold=self.scene_threshold,
            min_clip_s=self.min_clip_s,
            max_clip_s=self.max_clip_s,
            clip_s=self.clip_s,
            max_side=self.max_side,
            max_duration_s=self.max_video_s,
        )


def caption_model(max_chars: int) -> type[BaseModel]:
    """The caption's answer schema: one bounded description."""
    from pydantic import create_model

    return create_model("ClipCaption", __config__=STRICT, description=(str, bounded_text(max_chars)))


class VideoIngestGenerator(Generator):
    """``video_ingest``: a video file -> ``Meta`` and ``Clips`` with frames, captions and transcripts."""

    name = "video_ingest"
    Options = VideoIngestOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opts = self.opts
        self.caption_answer = caption_model(opts.max_caption_chars)
        self.videos = asyncio.Semaphore(opts.video_concurrency)
        env = settings.environment()
        self.transcriber: Any = None
        if opts.transcribe != "off" and env.transcription_url:
            if not env.transcription_model:
                raise ConfigError(
                    "VQA_TRANSCRIPTION_URL is set but VQA_TRANSCRIPTION_MODEL is not: name the speech-to-text model"
                )
            from vqa_operators.serving.openai_api import OpenAIServing

            self.transcriber = OpenAIServing(
                base_url=env.transcription_url, model=env.transcription_model, concurrency=max(1, self.serving.concurrency)
            )
        elif opts.transcribe == "on":
            raise ConfigError(
                "transcribe is on but no transcription endpoint is configured: set VQA_TRANSCRIPTION_URL and VQA_TRANSCRIPTION_MODEL"
            )

    @property
    def frames_root(self) -> str:
        """Where the frames go: ``frames_prefix``, else beside the run's output (``<output name>.frames``)."""
        if self.opts.frames_prefix:
            return self.opts.frames_prefix.rstrip("/")
        if self.output:
            return beside(self.output, FRAMES_SUFFIX)
        raise ConfigError("video_ingest needs frames_prefix (where to store the frames) outside a worker run")

    @property
    def opts(self) -> VideoIngestOptions:
        assert isinstance(self.options, VideoIngestOptions)
        return self.options

    @classmethod
    def output_fields(cls, options: Any) -> OutputFields:
        # no QA yet: what the video stages read
        return OutputFields(qa="QA", form="pairs", clips=options.clips_key, meta=options.meta_key)

    def answer_models(self) -> list[type[BaseModel]]:
        return [self.caption_answer]

    def provenance(self) -> dict[str, Any]:
        transcription = self.transcriber.model if self.transcriber is not None else None
        return {**super().provenance(), "transcription_model": transcription}

    async def aclose(self) -> None:
        if self.transcriber is not None:
            await self.transcriber.aclose()

    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        opts = self.opts
        path = row.get(opts.video_key)
        if path is None and opts.video_key not in row and opts.clips_key in row:
            return {}, {"ingest": "passed through: the row holds clips already"}
        path = self.required(row, opts.video_key)
        if not isinstance(path, str) or not path.strip():
            raise RowError(Reason.BAD_FIELD, f"{opts.video_key!r} must be a path or s3:// URI, got {type(path).__name__}")
        if opts.clips_key in row:
            raise RowError(Reason.BAD_FIELD, f"the row holds both {opts.video_key!r} and {opts.clips_key!r}: give one")
        uri = self.media.resolve(path)
        key = origin_key(row)
        loop = asyncio.get_running_loop()
        async with self.videos, contextlib.AsyncExitStack() as stack:
            local = await loop.run_in_executor(self.media.executor, self._local_copy, uri, path, stack)
            result, clips, frames = await loop.run_in_executor(self.media.executor, self._cut_and_store, local, key)
            meta = row.get(opts.meta_key)
            if meta is None or (isinstance(meta, str) and not meta.strip()):
                meta = self._describe_file(path, result, clips)
            about = meta if isinstance(meta, str) else json.dumps(meta, ensure_ascii=False)  # the seeds allow an object
            texts = await asyncio.gather(
                *(self._clip_texts(local, clip, len(clips), frames[clip.index], about, key) for clip in clips)
            )
        out_clips = []
        for clip, (description, audio) in zip(clips, texts, strict=True):
            out_clips.append(
                {
                    "Description": description,
                    "Audio_Text": audio,
                    CLIP_FRAMES: [uri for uri, _ in frames[clip.index]],
                    "Start": round(clip.start_s, 3),
                    "End": round(clip.end_s, 3),
                    "Frame_Times": [round(result.times[i], 3) for i in clip.frames],
                }
            )
        scene_changes = sum(1 for c in clips[1:] if result.changes[c.first] >= opts.scene_threshold > 0)
        details = {
            "video": {
                "path": path,
                **result.info.summary(),
                "frames_decoded": len(result.times),
                "end_s": round(result.end_s, 3),
            },
            "clips": len(clips),
            "scene_changes": scene_changes,
            "frames": sum(len(c.frames) for c in clips),
            "frames_prefix": f"{self.frames_root}/{key}",
        }
        return {opts.meta_key: meta, opts.clips_key: out_clips}, details

    def _local_copy(self, uri: str, path: str, stack: contextlib.AsyncExitStack) -> str:
        """A path FFmpeg can open: the file itself, or an S3 object copied to a temporary file (removed with ``stack``)."""
        if not is_s3(uri):
            try:
                size = os.path.getsize(uri)
            except FileNotFoundError:
                raise RowError(Reason.VIDEO_NOT_FOUND, f"{path}: no such file") from None
            except OSError as exc:
                raise RowError(Reason.VIDEO_UNREADABLE, f"{path}: {exc.strerror or exc}") from None
            if size == 0:
                raise RowError(Reason.VIDEO_UNREADABLE, f"{path}: the file is empty (0 bytes)")
            return uri
        handle = stack.enter_context(tempfile.NamedTemporaryFile(prefix="vqa-video-", suffix=os.path.splitext(uri)[1]))  # noqa: SIM115 - closed with stack
        try:
            self.media.storage.download(uri, handle)
        except FileNotFoundError:
            raise RowError(Reason.VIDEO_NOT_FOUND, f"{path}: no such object") from None
        except PermissionError as exc:
            raise RowError(Reason.VIDEO_UNREADABLE, f"{path}: {exc.strerror}") from None
        except ValueError as exc:  # a malformed s3:// URI in the row
            raise RowError(Reason.BAD_FIELD, f"{path}: {exc}") from None
        handle.flush()
        if handle.tell() == 0:
            raise RowError(Reason.VIDEO_UNREADABLE, f"{path}: the object is empty (0 bytes)")
        return handle.name

    def _cut_and_store(
        self, local: str, key: str
    ) -> tuple[Scan, list[ClipPlan], dict[int, list[tuple[str, PreparedImage | None]]]]:
        """Scan, plan the clips, extract their frames and store them; per clip, each frame's URI (and its image, to caption)."""
        rules = self.opts.rules
        result = scan(local, rules)
        clips = plan_clips(result, rules)
        where = {i: (clip.index, n) for clip in clips for n, i in enumerate(clip.frames)}
        frames: dict[int, list[tuple[str, PreparedImage | None]]] = {clip.index: [] for clip in clips}
        for index, data in extract(local, result, sorted(where), rules, max_pixels=self.media.max_pixels):
            clip, n = where[index]
            uri = f"{self.frames_root}/{key}/clip-{clip:03d}/frame-{n:02d}.jpg"
            with self.media.storage.open_atomic(uri, content_type="image/jpeg") as handle:
                handle.write(data)
            image = prepare_image(data, source=uri, max_pixels=self.media.max_pixels) if self.opts.caption else None
            frames[clip].append((uri, image))
        return result, clips, frames

    @staticmethod
    def _describe_file(path: str, result: Scan, clips: list[ClipPlan]) -> str:
        info = result.info
        return f"Video file {os.path.basename(path)}: {result.end_s:.1f} s, {info.width}x{info.height}, {len(clips)} clips."

    async def _clip_texts(
        self, local: str, clip: ClipPlan, total: int, frames: list[tuple[str, PreparedImage | None]], meta: str, key: str
    ) -> tuple[str, str]:
        """The clip's (Description, Audio_Text): the caption and the transcript, each empty when its step is off."""
        description, audio = "", ""
        if self.opts.caption:
            images = [image for _, image in frames if image is not None]
            text = self.prompts.render(
                "caption",
                meta=meta,
                number=clip.index + 1,
                total=total,
                start=clip.start_s,
                end=clip.end_s,
                shown=len(images),
                max_chars=self.opts.max_caption_chars,
            )
            messages = [{"role": "system", "content": self.prompts.render("system")}, self.user_message(images, text)]
            answer = await self.ask(messages, self.caption_answer, key=f"{key}:caption:{clip.index}")
            description = answer.description  # type: ignore[attr-defined]
        if self.transcriber is not None:
            loop = asyncio.get_running_loop()
            wav = await loop.run_in_executor(self.media.executor, audio_wav, local, clip.start_s, clip.end_s)
            if wav:
                audio = await self.transcriber.transcribe(wav, filename=f"clip-{clip.index:03d}.wav")
        return description, audio
