"""Slow tier: kubernetes mode for real, on the container tier. Each DAG runs through ``airflow dags test`` twice, in local mode
and in kubernetes mode, and both give the same dataset.

In kubernetes mode each worker pod is built by the pod operator from the rendered task and created
in a namespace whose pods podman runs (``tests/pod_tier.py``, ``testkit.cluster``): a container from
the worker image built from ``docker/worker.Dockerfile``, with its own network namespace, the
namespace's Secrets by reference, its volumes, limits and user, and the operator's own code around
it (the start wait, the log, the XCom read from the sidecar, the cleanup). The deployment's settings
are not the defaults, transcription included, and reach the pods only through their specs. The
servers (S3, the model double) are reached at this machine's address, in both modes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest

from testkit.data import make_jpeg
from testkit.openai_server import OpenAITestServer
from testkit.videos import write_video
from tests.airflow_env import airflow, in_home
from tests.pod_tier import API_KEY, AWS_SECRET, MODEL_CACHE, VLLM_IMAGE, PodTier

pytestmark = pytest.mark.slow

BUCKET = "vqa-pods"
WHISPER = "whisper-pods-test"


@pytest.fixture(scope="module")
def deployment(cluster_airflow: dict, _vlm_server: OpenAITestServer, pod_tier: PodTier) -> dict:
    """The deployment's (non-default) settings over the container tier's Airflow home."""
    env = dict(cluster_airflow["env"])
    env.update(
        {
            # the deployment's settings: none is a default, each changes what a worker does or refuses
            "VQA_MAX_NUM_SEQS": "6",
            "VQA_TRANSCRIPTION_URL": _vlm_server.url_at(pod_tier.address),
            "VQA_TRANSCRIPTION_MODEL": WHISPER,
            "VQA_ALLOWED_INPUT_ROOTS": f"s3://{BUCKET}/input",
            "VQA_ALLOWED_OUTPUT_ROOTS": f"s3://{BUCKET}/output",
            "VQA_ALLOWED_MEDIA_ROOTS": f"s3://{BUCKET}/media",
        }
    )
    return {"env": env}


@pytest.fixture(scope="module")
def data(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each DAG's input on S3: good rows and a bad one; video_qa's holds rows of clips and a video file with sound."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing-key-id",
        aws_secret_access_key="testing-secret-value",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)
    for i, size in enumerate([(320, 240), (200, 300), (640, 360), (500, 400)]):
        s3.put_object(Bucket=BUCKET, Key=f"media/img{i}.jpg", Body=make_jpeg(size))
    video = write_video(tmp_path_factory.mktemp("video") / "talk.mp4", [2.0, 2.0], fps=10)
    s3.upload_file(str(video), BUCKET, "media/talk.mp4")
    clips = [
        {"Description": "a runner", "Audio_Text": "Go.", "Frames_Images": ["img0.jpg", "img1.jpg"]},
        {"Description": "a shoe", "Audio_Text": "", "Frames_Images": ["img2.jpg"]},
    ]
    inputs = {
        "image_qa": [
            {"id": 1, "image": ["img0.jpg", "img1.jpg"]},
            {"id": 2, "image": "img2.jpg"},
            {"id": 3, "image": "missing.jpg"},
            {"id": 4, "image": "img3.jpg"},
        ],
        "pers_qa": [
            {"id": 1, "image": "img0.jpg", "subject_type": "person"},
            {"id": 2, "image": ["img1.jpg", "img2.jpg"]},
            {"id": 3, "image": "../escape.jpg"},
        ],
        "video_qa": [
            {"id": "a", "Meta": "Trail ad", "Clips": clips},
            {"id": "b", "video": "talk.mp4", "Meta": "A talk"},
            {"id": "c", "Meta": "broken", "Clips": []},
        ],
    }
    for dag_id, rows in inputs.items():
        s3.put_object(Bucket=BUCKET, Key=f"input/{dag_id}.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    return {dag_id: f"s3://{BUCKET}/input/{dag_id}.jsonl" for dag_id in inputs}


def dataset(s3, dag_id: str, run_id: str) -> dict[str, list]:
    """Every merged JSONL of the run (output, each stage's errors, rejected), the run's folder written as <run>: two runs' ids differ."""
    folder = f"output/{dag_id}/{run_id}"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=folder + "/").get("Contents", [])]
    found = {}
    for key in sorted(k for k in keys if k.endswith(".jsonl") and k.count("/") == 3):
        text = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
        found[key.rsplit("/", 1)[1]] = [
            json.loads(line) for line in text.replace(f"s3://{BUCKET}/{folder}", "<run>").splitlines()
        ]
    return found


def run_ids(s3, dag_id: str) -> set[str]:
    return {o["Key"].split("/")[2] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"output/{dag_id}/").get("Contents", [])}


@pytest.mark.parametrize(
    ("dag_id", "output", "extra"),
    [
        ("image_qa", "generate", {"pairs_per_row": 2}),
        ("pers_qa", "generate", {}),
        # one shard: five stages of pods already
        ("video_qa", "final", {"max_iterations": 1, "final_pairs": 3, "frames_per_clip": 2, "rows_per_shard": 3}),
    ],
)
def test_kubernetes_mode_gives_local_modes_dataset(
    vlm_server: OpenAITestServer, s3, deployment: dict, pod_tier: PodTier, data: dict, dag_id: str, output: str, extra: dict
) -> None:
    vlm_server.required_key = API_KEY  # a pod without the vqa-vlm Secret would be refused (401: ConfigError)
    vlm_server.transcription_model = WHISPER
    conf = {
        "input_uri": data[dag_id],
        "output_prefix": f"s3://{BUCKET}/output",
        "media_root": f"s3://{BUCKET}/media/",
        "seed": 7,
        "rows_per_shard": 2,
        "near_duplicate_threshold": 0.99,
        **extra,
    }
    # two runs of the same input, seed and settings; each writes under its own run id, so neither reuses the other's checkpoints
    runs = {}
    pods_before = len(pod_tier.pods())
    for mode in ("local", "pods"):
        env = pod_tier.env(deployment["env"]) if mode == "pods" else deployment["env"]
        before, transcribed = run_ids(s3, dag_id), len(vlm_server.transcriptions)
        proc = airflow("dags", "test", dag_id, "-c", json.dumps(conf), env=env, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        (run_id,) = run_ids(s3, dag_id) - before
        runs[mode] = dataset(s3, dag_id, run_id)
        if dag_id == "video_qa":  # the video file's two clips were transcribed, in both modes
            assert len(vlm_server.transcriptions) - transcribed == 2, mode

    assert runs["pods"] == runs["local"]
    assert runs["local"][f"{output}.jsonl"], "no rows came out"
    assert sum(len(rows) for name, rows in runs["local"].items() if name.endswith(".errors.jsonl")) == 1, (
        "the bad row is not in one errors file"
    )

    pods = pod_tier.pods()[pods_before:]
    stages = {
        "image_qa": {"generate", "quality"},
        "pers_qa": {"generate", "quality"},
        "video_qa": {"ingest", "initial", "multiagent", "final", "quality"},
    }[dag_id]
    assert {p["task_id"] for p in pods} == stages and all(p["exit_code"] == 0 for p in pods)
    for pod in pods:
        spec = pod["manifest"]["spec"]
        container = spec["containers"][0]
        # a pod that only calls a model service holds no GPU, and is not placed on GPU nodes
        assert not any("gpu" in name for name in container["resources"]["limits"]), container["resources"]
        assert not spec.get("nodeSelector") and not spec.get("tolerations") and pod["node"] == "cpu-1"
        # no model cache: the claim never holds a CPU pod back; the XCom sidecar ran from the pod's own image (no Docker Hub here)
        assert not any("persistentVolumeClaim" in v for v in spec["volumes"])
        assert {c["image"] for c in spec["containers"]} == {container["image"]} and spec["enableServiceLinks"] is False
        assert "--serve-vllm" not in container["args"] and "" not in container["args"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (env["VQA_MAX_NUM_SEQS"], env["VQA_TRANSCRIPTION_MODEL"]) == ("6", WHISPER)
        # the concurrency derived from the deployment's batch size (6 and a quarter), not vLLM's default 256, split between the
        # run's shards, which share the model service
        shards = sum(1 for p in pods if p["task_id"] == pod["task_id"])
        split = f", the server's budget split between {shards} shards" if shards > 1 else ""
        assert f"concurrency {-(-7 // shards)}{split})" in pod["logs"], pod["logs"][-2000:]
        assert API_KEY not in json.dumps(pod["manifest"]) and AWS_SECRET not in json.dumps(pod["manifest"])
        if pod["task_id"] == "ingest":
            assert (
                container["resources"]["requests"]["cpu"] == "4"
                and container["resources"]["requests"]["ephemeral-storage"] == "64Gi"
            )


@pytest.mark.vllm
def test_without_a_model_service_gpu_pods_start_vllm_and_give_the_dataset_a_vllm_service_gives(
    s3, cluster_airflow: dict, deployment: dict, pod_tier: PodTier, data: dict, tiny_idefics3: Path, tmp_path: Path
) -> None:
    """In-pod vLLM, as the pod spec stands: vLLM's CPU build from the CPU vLLM image, as the image's user over a read-only root,
    started by the worker with the deployment's vLLM settings, the model read from the model cache claim (a Hugging Face cache,
    as the Hub leaves it). Local mode calls vLLM serving the same model with the same flags on this machine; one request at a
    time on both, so both servers see the same requests in the same order. The generate stage's rows and errors are equal."""
    from scripts.local_vllm import serve_local_vllm, server_args
    from tests import real_vllm
    from vqa_operators.serving.vllm_server import CPU_ENV

    real_vllm.require_vllm()
    hub_cache(pod_tier.workdir / "claims" / MODEL_CACHE, tiny_idefics3)
    host_cache = hub_cache(tmp_path / "hf", tiny_idefics3)
    vllm_env = {**CPU_ENV, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    conf = {
        "input_uri": data["image_qa"],
        "output_prefix": f"s3://{BUCKET}/output",
        "media_root": f"s3://{BUCKET}/media/",
        "seed": 7,
        "rows_per_shard": 4,
        "pairs_per_row": 1,
        "concurrency": 1,
    }
    # the generate stage is the proof: every worker pod of this topology starts vLLM the same way (quality and merge are marked done)
    only_generate = ("--mark-success-pattern", "^(quality|merge)$")

    def run(env: dict[str, str], name: str) -> dict[str, list]:
        """One dags test in an Airflow home of its own (the two modes run side by side): the generate stage's files."""
        home = tmp_path / name
        home.mkdir()
        shutil.copy(cluster_airflow["pristine"], home / "airflow.db")
        proc = airflow("dags", "test", "image_qa", "-c", json.dumps(conf), *only_generate, env=in_home(env, home), timeout=900)
        assert proc.returncode == 0, (name, (proc.stdout + proc.stderr)[-6000:])
        with sqlite3.connect(home / "airflow.db") as db:
            ((run_id,),) = db.execute("SELECT run_id FROM dag_run WHERE dag_id='image_qa'").fetchall()
        return stage_files(s3, "image_qa", run_id, "generate")

    pods_before = len(pod_tier.pods())
    pods_env = pod_tier.env(deployment["env"])
    pods_env.update(
        # no model service: the connection names the model, and no host
        AIRFLOW_CONN_VQA_VLM=json.dumps({"conn_type": "http", "password": API_KEY, "extra": {"model": TINY_HUB_ID}}),
        VQA_VLLM_ARGS=shlex.join(server_args(None)),
        VQA_MAX_NUM_SEQS="8",
        VQA_POD_DEFAULTS=json.dumps({"env": vllm_env}),
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_pods = pool.submit(run, pods_env, "pods")
        with (
            mock.patch.dict(os.environ, {**vllm_env, "HF_HOME": str(host_cache)}),
            (tmp_path / "vllm.log").open("wb") as log,
            serve_local_vllm(TINY_HUB_ID, TINY_HUB_ID, max_num_seqs=8, log=log) as url,
        ):
            connection = json.dumps({"conn_type": "http", "host": url, "password": API_KEY, "extra": {"model": TINY_HUB_ID}})
            runs = {"local": run(dict(deployment["env"], AIRFLOW_CONN_VQA_VLM=connection), "local")}
        runs["pods"] = in_pods.result()

    assert runs["pods"] == runs["local"]
    assert len(runs["local"]["shard-00000.jsonl"]) == 3 and [e["reason"] for e in runs["local"]["shard-00000.errors.jsonl"]] == [
        "image_not_found"
    ]
    pods = pod_tier.pods()[pods_before:]
    assert [p["task_id"] for p in pods] == ["generate"] and pods[0]["exit_code"] == 0
    container, spec = pods[0]["manifest"]["spec"]["containers"][0], pods[0]["manifest"]["spec"]
    assert container["image"] == VLLM_IMAGE and "--serve-vllm" in container["args"]
    # on the GPU node (8 vCPU, 29 GiB allocatable, no Feature Discovery label) by its GPU request and toleration
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and not spec.get("nodeSelector")
    assert pods[0]["node"] == "gpu-1"
    assert re.search(
        rf"starting model server: \S+ -m vllm\.entrypoints\.openai\.api_server --model {TINY_HUB_ID} --host 127\.0\.0\.1 ",
        pods[0]["logs"],
    )
    assert "--max-num-seqs 8" in pods[0]["logs"] and "rows in" in pods[0]["logs"]
    # the pod's vLLM went with the pod: the succeeded pod was deleted, nothing of it runs
    assert pods[0]["name"] not in pod_tier.namespace.running()


# the tiny model under a Hub id, in a Hugging Face cache as a download leaves it: what a model cache volume holds
TINY_HUB_ID = "vqa-test/tiny-idefics3"


def hub_cache(home: Path, model: Path) -> Path:
    """``home`` as HF_HOME, holding ``model`` as the Hub's cache holds TINY_HUB_ID (refs/main → a snapshot), readable by every user."""
    repo = home / "hub" / f"models--{TINY_HUB_ID.replace('/', '--')}"
    revision = "0" * 39 + "1"
    shutil.copytree(model, repo / "snapshots" / revision, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return home


def stage_files(s3, dag_id: str, run_id: str, stage: str) -> dict[str, list]:
    """A stage's staged JSONL (each shard's output and errors), the run's own folder written as <run>."""
    folder = f"output/{dag_id}/{run_id}"
    found = {}
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{folder}/{stage}/").get("Contents", []):
        key = item["Key"]
        if key.endswith(".jsonl") and ".checkpoint/" not in key:
            text = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            found[key.rsplit("/", 1)[1]] = [
                json.loads(line) for line in text.replace(f"s3://{BUCKET}/{folder}", "<run>").splitlines()
            ]
    return found
