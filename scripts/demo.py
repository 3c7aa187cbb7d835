"""`make demo`: the three pipelines (image_qa, pers_qa, video_qa) on one machine, with nothing configured.

Starts a model server, an embedded S3 server (moto) and Airflow standalone (SQLite, LocalExecutor,
in-process execution), uploads generated sample data (images; a video as frame sequences, and a
video file that video_qa's first task ingests: cuts into clips, samples frames, captions) with an
input JSONL per DAG, triggers the three DAGs through the REST API, waits, and prints each
manifest, a record and the QA preview link. Exits non-zero on any failure, and says why.

The model, in this order:
- ``VQA_BASE_URL``: an OpenAI-compatible server you run (vLLM on a GPU); ``VQA_MODEL`` if it serves several;
- ``VQA_MODEL``: a Hub id or a local folder, served here;
- otherwise SmolVLM-256M-Instruct from the Hugging Face Hub if the Hub can be reached, else a
  tiny random-weight model of the same architecture built here (its answers are noise).
A model served here runs on vLLM's CPU build (``.venv-vllm``) where it installs, else on
transformers (``VQA_BACKEND=transformers`` forces that); both decode guided by the JSON schema.

Set DEMO_KEEP=1 to keep Airflow (http://localhost:<port>) and S3 running afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from vqa_operators import settings  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "vqa-demo"
NOISE = """\
The Hugging Face Hub cannot be reached from this machine, so the demo serves a tiny random-weight
model it built here ({folder}, by scripts/tiny_vlm.py): its answers are NOISE. Guided decoding
still holds them to each request's JSON schema, so every stage runs for real. For real answers,
set VQA_MODEL=<Hub id or local folder> (for example {hub}) or VQA_BASE_URL=<a vLLM server>."""


@dataclass(frozen=True)
class ModelChoice:
    """What serves the demo: a server's URL, or a model served here by ``engine``; and the words that describe it."""

    model: str  # the name requests use
    engine: str  # "server" (VQA_BASE_URL), "vllm" (vLLM's CPU build here) or "transformers"
    source: str | None = None  # what is loaded, for "vllm" and "transformers": a Hub id or a folder
    base_url: str = ""
    noise: bool = False

    def describe(self) -> str:
        where = {
            "server": f"the server at {self.base_url}",
            "vllm": "vLLM's CPU build on this machine",
            "transformers": "transformers on this machine's CPU",
        }
        what = " (a tiny random-weight model built here: its answers are noise)" if self.noise else ""
        return f"{self.model}{what}, served by {where[self.engine]}"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def wait_for(what: str, check, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(1)
    raise SystemExit(f"[demo] FAILED: {what} not ready after {timeout:.0f}s ({last})")


def served_model(base_url: str) -> str:
    models = http("GET", base_url.rstrip("/") + "/models", token=settings.variable(settings.API_KEY_ENV))
    ids = [m["id"] for m in models.get("data", [])]
    if len(ids) != 1:
        raise SystemExit(f"[demo] set VQA_MODEL: the server at {base_url} serves {ids}")
    return ids[0]


def jpeg(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sample_images() -> dict[str, bytes]:
    """Synthetic scenes (shapes), so the demo needs no downloads."""
    from PIL import Image, ImageDraw

    scenes = {
        "red_ball.jpg": ((640, 480), (70, 130, 180), [("ellipse", (220, 140, 420, 340), (220, 30, 30))]),
        "two_boxes.jpg": (
            (800, 600),
            (240, 240, 230),
            [("rectangle", (80, 200, 300, 420), (30, 160, 60)), ("rectangle", (450, 150, 700, 400), (250, 200, 0))],
        ),
        "traffic_light.jpg": (
            (480, 640),
            (20, 20, 30),
            [
                ("rectangle", (170, 80, 310, 560), (60, 60, 60)),
                ("ellipse", (200, 110, 280, 190), (230, 0, 0)),
                ("ellipse", (200, 290, 280, 370), (80, 80, 0)),
                ("ellipse", (200, 460, 280, 540), (0, 90, 0)),
            ],
        ),
        "sunset.jpg": (
            (1024, 576),
            (250, 150, 60),
            [("ellipse", (412, 300, 612, 500), (255, 220, 80)), ("rectangle", (0, 420, 1024, 576), (30, 60, 120))],
        ),
        # the same figure (the personalised QA's main character) in two settings
        "figure_park.jpg": (
            (640, 480),
            (120, 190, 110),
            [
                ("ellipse", (290, 90, 350, 150), (240, 200, 170)),
                ("rectangle", (285, 150, 355, 300), (200, 40, 40)),
                ("rectangle", (290, 300, 350, 420), (40, 40, 120)),
            ],
        ),
        "figure_beach.jpg": (
            (640, 480),
            (240, 220, 160),
            [
                ("rectangle", (0, 0, 640, 200), (90, 160, 230)),
                ("ellipse", (400, 120, 460, 180), (240, 200, 170)),
                ("rectangle", (395, 180, 465, 330), (200, 40, 40)),
                ("rectangle", (400, 330, 460, 450), (40, 40, 120)),
            ],
        ),
    }
    out = {}
    for name, (size, background, shapes) in scenes.items():
        img = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(img)
        for kind, box, colour in shapes:
            getattr(draw, kind)(box, fill=colour)
        out[name] = jpeg(img)
    return out


def sample_video(
    name: str, clips: list[tuple[tuple[int, int, int], tuple[int, int, int], str, str]], frames_per_clip: int = 6
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A video as frame sequences: per clip, a ball moving across a background; returns (files, row)."""
    from PIL import Image, ImageDraw

    files: dict[str, bytes] = {}
    row_clips = []
    for c, (background, ball, description, audio) in enumerate(clips):
        paths = []
        for f in range(frames_per_clip):
            img = Image.new("RGB", (640, 360), background)
            x = 40 + f * (560 // frames_per_clip)
            ImageDraw.Draw(img).ellipse((x, 150, x + 60, 210), fill=ball)
            path = f"media/video/{name}/clip{c}_frame{f:02d}.jpg"
            files[path] = jpeg(img)
            paths.append(path)
        row_clips.append({"Audio_Text": audio, "Frames_Images": paths, "Description": description})
    return files, {"id": name, "Clips": row_clips}


VIDEO_FILE = "media/video/sunset_teaser.mp4"


def sample_video_file() -> bytes:
    """An H.264 MP4 written here with PyAV: two 2-second scenes cut hard, a sliding square in each, a tone as its sound."""
    import tempfile

    from testkit.videos import write_video

    with tempfile.TemporaryDirectory() as folder:
        return write_video(Path(folder) / "video.mp4", [2.0, 2.0], fps=8, size=(320, 180)).read_bytes()


def sample_data() -> tuple[dict[str, bytes], dict[str, list[dict[str, Any]]]]:
    """Every object to upload (key -> bytes) and each DAG's input rows."""
    files = {f"media/{name}": data for name, data in sample_images().items()}
    video_rows = []
    for name, meta, clips in [
        (
            "bouncing_ad",
            "A 15-second advertisement for a bouncy ball brand, aimed at children.",
            [
                (
                    (70, 130, 180),
                    (220, 30, 30),
                    "A red ball rolls across a blue background.",
                    "Meet Bouncy, the ball that never stops!",
                ),
                ((240, 240, 230), (250, 200, 0), "A yellow ball crosses a bright studio.", "Now in five colours."),
                ((20, 20, 30), (0, 200, 90), "A green ball glows in the dark.", "Bouncy. Play all night."),
            ],
        ),
    ]:
        video_files, row = sample_video(name, clips)
        files.update(video_files)
        video_rows.append({**row, "Meta": meta})
    # a video file: video_qa's ingest task finds its two scenes, samples their frames and captions them
    files[VIDEO_FILE] = sample_video_file()
    video_rows.append({"id": "sunset_teaser", "video": VIDEO_FILE, "Meta": "A calm teaser for a travel company."})
    rows: dict[str, list[dict[str, Any]]] = {
        "image_qa": [
            {"id": "scene-1", "image": ["media/red_ball.jpg"]},
            {"id": "scene-2", "image": ["media/two_boxes.jpg", "media/traffic_light.jpg"]},
            {"id": "scene-3", "image": "media/sunset.jpg"},
            {"id": "scene-4", "image": ["media/traffic_light.jpg"]},
        ],
        "pers_qa": [
            {"id": "figure", "image": ["media/figure_park.jpg", "media/figure_beach.jpg"], "subject_type": "person"},
            {"id": "ball", "image": "media/red_ball.jpg", "subject_type": "object"},
            {"id": "light", "image": ["media/traffic_light.jpg"]},
        ],
        "video_qa": video_rows,
    }
    return files, rows


# each DAG's run conf (beyond input and output), small enough for a CPU: every pair costs three quality checks;
# every DAG's `merge` task returns the run's manifest
# the checks annotate: every pair is kept with its verdicts (the demo's model is random, so filtering would leave little)
RUNS: dict[str, dict[str, Any]] = {
    "image_qa": {"pairs_per_row": 2, "quality_mode": "annotate"},
    "pers_qa": {"tag": "<mam>", "quality_mode": "annotate"},
    "video_qa": {"max_frames": 8, "max_iterations": 1, "final_pairs": 4, "quality_mode": "annotate"},
}


def hub_reachable(model: str) -> bool:
    """Whether the Hugging Face Hub answers for ``model`` (5 s at most); never with HF_HUB_OFFLINE set."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "True"):
        return False
    try:
        with urllib.request.urlopen(f"https://huggingface.co/api/models/{model}", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def choose_model(work: Path) -> ModelChoice:
    """The model and what serves it (see the module docstring); builds the tiny model if it comes to that."""
    from scripts.local_vllm import vllm_available
    from scripts.tiny_vlm import SERVED_NAME, build_tiny_idefics3
    from vqa_operators.serving.transformers_local import DEFAULT_CPU_MODEL

    env = settings.environment()
    base_url = (env.base_url or "").strip()
    if base_url:
        return ModelChoice(env.model or served_model(base_url), "server", base_url=base_url)
    engine = "transformers" if env.backend == "transformers" or vllm_available() else "vllm"
    if engine == "transformers" and env.backend != "transformers":
        say(f"vLLM's CPU build is not installed here ({vllm_available()}): the model runs on transformers")
    if model := (env.model or "").strip():
        return ModelChoice(model, engine, source=model)
    if hub_reachable(DEFAULT_CPU_MODEL):
        return ModelChoice(DEFAULT_CPU_MODEL, engine, source=DEFAULT_CPU_MODEL)
    folder = work / "models" / SERVED_NAME
    if not (folder / "config.json").exists():
        build_tiny_idefics3(folder)
    print(NOISE.format(folder=folder, hub=DEFAULT_CPU_MODEL), flush=True)
    return ModelChoice(SERVED_NAME if engine == "vllm" else str(folder), engine, source=str(folder), noise=True)


def context_length(model: str) -> int:
    """The model's context in tokens (its config's max_position_embeddings), at most the demo's 16k."""
    from transformers import AutoConfig

    from scripts.local_vllm import MAX_MODEL_LEN

    config = AutoConfig.from_pretrained(model)
    text = getattr(config, "text_config", None) or config
    return min(MAX_MODEL_LEN, int(getattr(text, "max_position_embeddings", MAX_MODEL_LEN)))


def last_error(log_file: Path, limit: int = 3) -> str:
    """The last lines of a log that say what went wrong (an exception, an error line), for the demo's message."""
    if not log_file.exists():
        return "(no log)"
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "Exception" in line]
    return " | ".join((errors or lines)[-limit:])[-1500:]


def failure_causes(api: str, token: str, dag_id: str, run_id: str) -> list[str]:
    """For each failed task of the run, the line its failure callback logged: which try failed, and why."""
    base = f"{api}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
    causes = []
    for ti in http("GET", f"{base}?state=failed", token=token)["task_instances"]:
        index = ti.get("map_index", -1)
        url = f"{base}/{ti['task_id']}/logs/{ti['try_number']}?full_content=true" + (f"&map_index={index}" if index >= 0 else "")
        events = http("GET", url, token=token).get("content") or []
        texts = [str(e.get("event", e)) if isinstance(e, dict) else str(e) for e in events]
        cause = next((t for t in reversed(texts) if "failed for good:" in t or "failed, will retry:" in t), None)
        cause = cause or next((t for t in reversed(texts) if "Error" in t), "no error in its log")
        causes.append(f"{ti['task_id']}{f'[{index}]' if index >= 0 else ''}: {cause[:1500]}")
    return causes


def main() -> int:
    work = Path(settings.environment().demo_dir or ROOT / ".demo").resolve()
    shutil.rmtree(work / "airflow", ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "output").mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(work / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # noqa: S603

    with contextlib.ExitStack() as stack:
        try:
            choice = choose_model(work)
        except (OSError, ValueError, urllib.error.URLError) as err:  # a model server that does not answer, a bad VQA_MODEL ...
            say(f"FAILED: no model to run: {err}")
            return 2
        say(f"the model: {choice.describe()}")
        base_url = choice.base_url
        vllm_log = work / "logs" / "vllm.log"
        if choice.engine == "vllm":
            from scripts.local_vllm import serve_local_vllm
            from vqa_operators.exceptions import ServerUnavailableError

            assert choice.source is not None
            say(f"starting vLLM's CPU build on {choice.source} (log: {vllm_log}); it takes a minute")
            try:
                length = context_length(choice.source)
                log = stack.enter_context(vllm_log.open("wb"))
                local = choice.noise or Path(choice.source).exists()
                base_url = stack.enter_context(
                    serve_local_vllm(choice.source, choice.model, log=log, offline=local, max_model_len=length)
                )
            except (ServerUnavailableError, OSError, ValueError) as err:
                say(f"FAILED: the model server could not start: {err}")
                say(f"vLLM's last words ({vllm_log}): {last_error(vllm_log)}")
                return 1
            say(f"vLLM serves {choice.model} at {base_url}")
        try:
            return run_dags(work, choice, base_url, start)
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


# what merge exports beside the JSONL, as the demo names it
EXPORT_NAMES = {
    "hf": "Hub-ready folder (datasets, TRL)",
    "sharegpt": "ShareGPT JSON (LLaMA-Factory)",
    "dataset_info": "LLaMA-Factory dataset_info.json",
    "llava": "LLaVA conversation JSON",
    "parquet": "flat Parquet",
    "media": "media copies",
    "card": "dataset card",
}


def ingested(s3: Any, manifest: dict[str, Any]) -> list[str]:
    """What video_qa's ingest made of each video file: its clips, their spans and frames, and where the frames are."""
    bucket, key = manifest["output"][len("s3://") :].split("/", 1)
    folder = key.rsplit("/", 1)[0] + "/ingest/"
    lines = []
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=folder)["Contents"]:
        if not obj["Key"].endswith(".jsonl") or obj["Key"].endswith(".errors.jsonl"):
            continue
        for row in map(json.loads, s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode().splitlines()):
            if "video" in row:
                spans = ", ".join(f"{c['Start']:g}-{c['End']:g} s" for c in row["Clips"])
                frames = sum(len(c["Frames_Images"]) for c in row["Clips"])
                where = row["Clips"][0]["Frames_Images"][0].rsplit("/", 2)[0] + "/"
                lines.append(f"ingested {row['video']}: {len(row['Clips'])} clips ({spans}), {frames} frames in {where}")
    return lines


def acceptance(manifest: dict[str, Any]) -> str:
    """The share of judged pairs the quality checks kept, as a percentage (n/a when none was judged)."""
    rate = manifest.get("acceptance_rate")
    return "n/a" if rate is None else f"{rate:.1%}"


def run_dags(work: Path, choice: ModelChoice, base_url: str, start: Any) -> int:
    """S3, Airflow standalone, the three DAG runs and their results; 0 when every DAG run succeeded and made rows (kept or rejected)."""
    import boto3

    s3_port = free_port(5055)
    s3_url = f"http://127.0.0.1:{s3_port}"
    say(f"starting embedded S3 (moto) on {s3_url}")
    start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], dict(os.environ))
    s3 = boto3.client("s3", endpoint_url=s3_url, aws_access_key_id="demo", aws_secret_access_key="demo", region_name="us-east-1")
    wait_for("S3 server", lambda: urllib.request.urlopen(s3_url, timeout=2).status == 200, 30)
    s3.create_bucket(Bucket=BUCKET)
    files, rows = sample_data()
    for key, data in files.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    for dag_id, dag_rows in rows.items():
        s3.put_object(Bucket=BUCKET, Key=f"input/{dag_id}.jsonl", Body="".join(json.dumps(r) + "\n" for r in dag_rows).encode())
    say(
        f"uploaded {len(files) - 1} images and frames, a video file ({VIDEO_FILE}) and {sum(map(len, rows.values()))} rows to s3://{BUCKET}/"
    )

    api_port = free_port(8080)
    api = f"http://localhost:{api_port}"
    home = work / "airflow"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        # SQLite's busy timeout at 60 s (pysqlite's default is 5): `airflow backfill create` beside the running
        # scheduler waits for its write lock instead of failing with "database is locked"
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db?timeout=60",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
            {
                "conn_type": "aws",
                "login": "demo",
                "password": "demo",
                "extra": {"endpoint_url": s3_url, "region_name": "us-east-1"},
            }
        ),
        "AIRFLOW_CONN_VQA_VLM": json.dumps(
            {
                "conn_type": "http",
                "host": base_url,
                "password": settings.variable(settings.API_KEY_ENV) or "",
                "extra": {"model": choice.model},
            }
        ),
        "VQA_BACKEND": "transformers" if choice.engine == "transformers" else "openai",
        "VQA_EXECUTION": "local",
        # the demo's data: the DAGs' default locations in the trigger form lie in its bucket
        "VQA_DATA_ROOT": f"s3://{BUCKET}",
        # the demo triggers its own runs; a daily schedule would also start runs over s3://vqa-demo/raw/<dag>/<today>/
        "VQA_SCHEDULE": "none",
        # a failing task is retried after seconds, not minutes, so that the demo reports it soon
        "VQA_RETRY_DELAY_SECONDS": "5",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    say(f"starting Airflow standalone on {api} (log: {work / 'logs' / 'airflow.log'})")
    start("airflow", [str(BIN / "airflow"), "standalone"], env)
    wait_for("Airflow API", lambda: http("GET", f"{api}/api/v2/monitor/health")["scheduler"]["status"] == "healthy", 240)
    password_file = home / "simple_auth_manager_passwords.json.generated"
    password = wait_for("admin password", lambda: json.loads(password_file.read_text()).get("admin"), 60)
    token = http("POST", f"{api}/auth/token", {"username": "admin", "password": password})["access_token"]
    runs = {}
    for dag_id, extra in RUNS.items():
        wait_for(f"{dag_id} DAG", lambda dag_id=dag_id: http("GET", f"{api}/api/v2/dags/{dag_id}", token=token), 120)
        http("PATCH", f"{api}/api/v2/dags/{dag_id}", {"is_paused": False}, token=token)
        conf = {
            "input_uri": f"s3://{BUCKET}/input/{dag_id}.jsonl",
            "output_prefix": f"s3://{BUCKET}/output",
            "media_root": f"s3://{BUCKET}/",
            "seed": 0,
            **extra,
        }
        runs[dag_id] = http("POST", f"{api}/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf}, token=token)[
            "dag_run_id"
        ]
        say(f"triggered {dag_id} run {runs[dag_id]}")
    failed = False
    made: dict[str, int] = {}
    for dag_id, run_id in runs.items():
        run_url = f"{api}/api/v2/dags/{dag_id}/dagRuns/{run_id}"
        state = wait_for(
            f"the {dag_id} run",
            lambda run_url=run_url: (s := http("GET", run_url, token=token)["state"]) in ("success", "failed") and s,
            1800,
        )
        if state != "success":
            failed = True
            say(f"FAILED: {dag_id} run ended {state}. Why:")
            for cause in failure_causes(api, token, dag_id, run_id):
                say(f"  {dag_id}.{cause}")
            if choice.engine == "vllm":
                say(f"  the model server's log ends: {last_error(work / 'logs' / 'vllm.log')}")
            say(f"  (task logs: the UI at {api} or {home / 'logs'})")
            continue
        manifest = http("GET", f"{run_url}/taskInstances/merge/xcomEntries/return_value", token=token)["value"]
        if isinstance(manifest, str):
            manifest = json.loads(manifest)
        bucket, key = manifest["output"][len("s3://") :].split("/", 1)
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        (work / "output" / f"{dag_id}.jsonl").write_bytes(body)
        records = [json.loads(line) for line in body.decode().splitlines()]
        say(
            f"{dag_id}: rows_in={manifest['rows_in']} rows_out={manifest['rows_out']} rows_failed={manifest['rows_failed']} "
            f"rows_rejected={manifest['rows_rejected']} failures={manifest['failures_by_reason']}"
        )
        say(
            f"{dag_id}: quality checks kept {manifest['pairs_kept']} pairs and rejected {manifest['pairs_rejected']} "
            f"(acceptance {acceptance(manifest)}) {manifest['rejections_by_reason']}"
        )
        if manifest.get("quality_scores"):
            from vqa_operators.records import QualityScores

            say(
                f"{dag_id}: verdicts (annotated, every pair kept): {QualityScores.model_validate(manifest['quality_scores']).describe()}"
            )
        say(
            f"{dag_id}: output {manifest['output']} (copied to {work / 'output' / f'{dag_id}.jsonl'}); errors "
            f"{manifest['errors']}; rejected {manifest['rejected']}"
        )
        if "ingest" in manifest["stages"]:
            for line in ingested(s3, manifest):
                say(f"{dag_id}: {line}")
        for name, uri in (manifest.get("exports") or {}).items():
            say(f"{dag_id}: {EXPORT_NAMES.get(name, name)} {uri}")
        links = http("GET", f"{run_url}/taskInstances/merge/links", token=token)["extra_links"]
        say(f"{dag_id}: QA preview {links['QA preview']}")  # the presigned URL the merge task made
        if records:
            shown = {k: v for k, v in records[0].items() if k != "vqa_provenance"}
            print(json.dumps(shown, ensure_ascii=False, indent=2)[:2500], flush=True)
        made[dag_id] = manifest["rows_out"]
        if manifest["rows_out"] + manifest["rows_rejected"] == 0:
            say(f"FAILED: {dag_id} produced no rows; the errors file says why: {manifest['errors']}")
            failed = True
        elif manifest["rows_out"] == 0:
            say(f"{dag_id}: the quality checks rejected every row; the rejected file says why: {manifest['rejected']}")
    if failed:
        return 1
    say(
        f"every DAG ran ({', '.join(f'{dag_id}: {n} rows out' for dag_id, n in made.items())}); the model was {choice.describe()}"
    )
    if choice.noise:
        say("remember: that model has random weights, so the questions and answers are noise in the right shape,")
        say("and the quality checks' verdicts come from the same model, so which pairs they keep is chance")
    if os.environ.get("DEMO_KEEP"):
        say(f"DEMO_KEEP set: Airflow at {api} (admin / {password}), S3 at {s3_url}; Ctrl-C to stop")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
