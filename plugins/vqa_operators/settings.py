"""Every setting's one home: the defaults, and the ``VQA_*`` environment variables (read here and nowhere else).

The worker CLI, ``JobOptions``, ``WorkerSpec``, the DAG params and the serving classes take their
defaults from the constants below. ``environment()`` reads the variables afresh on each call, so a
process (or a test) that changes its environment sees the change. A bad value is a ConfigError
that names the variable. README's configuration table documents each variable; a test checks it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vqa_operators.exceptions import ConfigError

# sampling, sent with every request
TEMPERATURE = 0.7
TOP_P = 0.9
MAX_TOKENS = 1024
# pixels per image after downscaling: Qwen2.5-VL's common serving budget (1280 visual tokens of 28x28 pixels)
MAX_PIXELS = 1280 * 28 * 28
# the model server's batch size (vLLM's --max-num-seqs, 256 by default); the requests in flight derive from it
MAX_NUM_SEQS = 256
# the in-process vLLM engine (the seeds' LocalModelVLMServing_vllm): the GPU memory it takes (vLLM's own default), and images per prompt
VLLM_GPU_MEMORY_UTILIZATION = 0.9
MAX_IMAGES_PER_PROMPT = 16
# images a row may hold, and video: frames per request (sampled evenly across the clips) and each frame's pixel budget
MAX_IMAGES_PER_ROW = 8
MAX_FRAMES = 16
FRAME_MAX_PIXELS = 448 * 448
# the HTTP client
REQUEST_TIMEOUT_S = 300.0
MAX_RETRIES = 5
MAX_CONSECUTIVE_FAILURES = 10
API_URL = "http://localhost:8000/v1"
# the object store: attempts per request (boto's own default is 3), retried in boto's adaptive mode (it slows
# down on throttling); a read cut off mid-body resumes from where it stopped, as many times again
S3_MAX_ATTEMPTS = 10
# the worker's checkpoint: after this many finished rows, or this many seconds
CHECKPOINT_EVERY = 64
CHECKPOINT_SECONDS = 30.0
# sharding: rows per shard and most shards of a run (MAX_SHARDS_LIMIT bounds what a run may ask for)
ROWS_PER_SHARD = 10_000
MAX_SHARDS = 16
MAX_SHARDS_LIMIT = 256  # Airflow's max_map_length is 1024 by default; a plan never comes near it
# the port --serve-vllm starts vLLM on
VLLM_PORT = 8000
# what a worker pod may take to stop after SIGTERM (Kubernetes' default, set explicitly in the pod spec)
POD_GRACE_PERIOD_S = 30
# the longest a worker task runs (its execution_timeout; a pod's activeDeadlineSeconds): a fixed part (start, model load,
# checkpoints) and a part per row of its shard; a bound on a hung task, not an estimate: raise it for slow models
TASK_TIMEOUT_S = 3600
TASK_SECONDS_PER_ROW = 5.0
# how long the QA preview's presigned link opens the page (SigV4 allows at most 7 days; 0: no link)
PREVIEW_LINK_SECONDS = 24 * 3600
PRESIGN_LIMIT_SECONDS = 7 * 24 * 3600

# quality: the lowest grounding score (1-5) a kept pair may have, and the merge's near-duplicate Jaccard threshold
MIN_JUDGE_SCORE = 3
NEAR_DUPLICATE_THRESHOLD = 0.8

# an allowed root: an absolute folder, or s3://bucket[/prefix]
ROOT = re.compile(r"/.*|s3://[^/\s]+(/.*)?")
# the data's location: the DAGs' default input_uri, output_prefix and media_root derive from it, so it is what their params accept
DATA_ROOT = re.compile(r"/.+|s3://[a-z0-9.-]{3,63}(/.*)?")

PREFIX = "VQA_"
API_KEY_ENV = PREFIX + "API_KEY"


def include_dir() -> Path:
    """The prompt and report templates: inside the installed package (a wheel), else the repository's ``include/``."""
    packaged = Path(__file__).resolve().parent / "include"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "include"


def default_concurrency(max_num_seqs: int) -> int:
    """Requests in flight for a server that batches ``max_num_seqs``: a quarter more, so a freed slot never waits for the client."""
    return max_num_seqs + max(1, max_num_seqs // 4)


def effective_concurrency(concurrency: int | None, max_num_seqs: int, sharing: int = 1) -> int:
    """Requests to keep in flight: ``concurrency`` if set, else the server's budget split between the ``sharing`` tasks
    that send to it at once (a run's shards), rounded up."""
    return concurrency or -(-default_concurrency(max_num_seqs) // sharing)


# marks a setting that the worker reads: every worker pod gets it (worker_env), as an in-process worker sees it; a
# JobOptions field so marked takes its VQA_* variable when the caller does not give it
WORKER: dict[str, Any] = {"worker": True}


def is_worker_setting(info: FieldInfo) -> bool:
    """Whether a field is marked ``WORKER``: a ``VQA_*`` variable the worker reads."""
    return isinstance(info.json_schema_extra, dict) and bool(info.json_schema_extra.get("worker"))


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _comma_separated(value: Any) -> Any:
    return [root.strip() for root in value.split(",") if root.strip()] if isinstance(value, str) else value


def _roots(roots: list[str]) -> list[str]:
    for root in roots:
        if not ROOT.fullmatch(root) or any(part in (".", "..") for part in root.split("/")):
            raise ValueError(
                f"a comma-separated list of absolute folders and s3://bucket[/prefix]es without . or .. segments ({root!r} is not one)"
            )
    return roots


# folders and s3://bucket[/prefix]es: a list, or one comma-separated string (a variable's form)
Roots = Annotated[list[str], NoDecode, BeforeValidator(_comma_separated), AfterValidator(_roots)]
Backend = Annotated[Literal["openai", "transformers"], BeforeValidator(_lower)]


class WorkerSettings(BaseSettings):
    """The worker's settings that a deployment sets as ``VQA_<FIELD>`` variables and a run may give as options: declared here
    once, for ``Environment`` (what Airflow's processes read) and ``worker.JobOptions`` (what one run is given) alike."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", case_sensitive=False)

    backend: Backend = Field(
        "openai",
        json_schema_extra=WORKER,
        description="openai: an OpenAI-compatible server such as vllm serve; transformers: the model on this machine's CPU (the demo)",
    )
    base_url: str | None = Field(None, json_schema_extra=WORKER, description="the model server's OpenAI-compatible /v1 URL")
    model: str | None = Field(
        None,
        title="Model",
        json_schema_extra=WORKER,
        description=(
            "The served model's name (vLLM), or with VQA_BACKEND=transformers a Hub id or a local folder. "
            "Empty: the vqa_vlm connection's extra.model, else VQA_MODEL."
        ),
    )
    max_num_seqs: int = Field(
        MAX_NUM_SEQS,
        ge=1,
        le=65536,
        json_schema_extra=WORKER,
        description="the model server's batch size, vLLM's --max-num-seqs",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        le=4096,
        title="Requests in flight",
        json_schema_extra=WORKER,
        description=(
            "Model requests each task keeps in flight. Empty: the server's batch size (VQA_MAX_NUM_SEQS, vLLM's --max-num-seqs, "
            f"{MAX_NUM_SEQS} by default) and a quarter more, split between the run's shards, which share the server "
            "(a pod that starts its own vLLM keeps it all)."
        ),
    )
    media_root: str = Field(
        ".",
        title="Media root",
        json_schema_extra=WORKER,
        description="Folder or s3:// prefix that relative image paths are resolved against, within the deployment's allowed media roots.",
    )
    # where a run may read media, read its input and write its output: deployment settings, not run parameters
    # (for a DAG run, none configured means s3:// only; see run_params)
    allowed_media_roots: Roots = Field(
        default_factory=list,
        json_schema_extra=WORKER,
        description="folders and s3://bucket[/prefix]es rows may read media from (default: the media root)",
    )
    allowed_input_roots: Roots = Field(default_factory=list, json_schema_extra=WORKER, description="where the input may be read")
    allowed_output_roots: Roots = Field(
        default_factory=list, json_schema_extra=WORKER, description="where the output, errors and staging may be written"
    )

    @property
    def effective_concurrency(self) -> int:
        """Requests to keep in flight: ``concurrency``, else derived from ``max_num_seqs``."""
        return effective_concurrency(self.concurrency, self.max_num_seqs)


class Environment(WorkerSettings):
    """The ``VQA_<FIELD>`` environment variables; unset and empty ones take these defaults.

    A field marked ``WORKER`` is read by the worker, so ``worker_env`` hands it to every worker
    pod; the others are read by Airflow's own processes (DAG parsing, plan, merge) only.
    """

    # the video ingest's speech-to-text: an OpenAI-compatible /v1 URL (vLLM serving Whisper) and its model
    transcription_url: str | None = Field(None, json_schema_extra=WORKER)
    transcription_model: str | None = Field(None, json_schema_extra=WORKER)
    # the object store's retries, for every read and write of input, media, checkpoint and output
    s3_max_attempts: int = Field(S3_MAX_ATTEMPTS, ge=1, le=100, json_schema_extra=WORKER)
    # the QA preview's presigned link: seconds it opens the page; 0 logs no link
    preview_link_seconds: int = Field(PREVIEW_LINK_SECONDS, ge=0, le=PRESIGN_LIMIT_SECONDS)
    # the worker process (a custom prompts folder must exist at the same path in the worker image)
    xcom_file: str | None = None
    prompts_dir: str | None = Field(None, json_schema_extra=WORKER)
    vllm_command: str = Field("", json_schema_extra=WORKER)
    vllm_args: str = Field("", json_schema_extra=WORKER)
    vllm_port: int = Field(VLLM_PORT, ge=1, le=65535, json_schema_extra=WORKER)
    # Airflow: the dag-processor and workers
    execution: Literal["local", "kubernetes"] = "local"
    # a worker task's time limit: task_timeout_seconds plus task_seconds_per_row for each row of its shard (0: none)
    task_timeout_seconds: int = Field(TASK_TIMEOUT_S, ge=0)
    task_seconds_per_row: float = Field(TASK_SECONDS_PER_ROW, ge=0)
    # where the model runs for a DAG run: "connection" (the vqa_vlm connection's host; without one, vLLM in each
    # worker pod) or "run" (one vLLM server for the whole run, started by a setup task, stopped by a teardown task)
    model_server: Literal["connection", "run"] = "connection"
    # the data's location (s3://bucket[/prefix] or a folder): the DAGs' default input_uri, output_prefix and media_root
    data_root: str | None = None
    schedule: str = "@daily"
    retry_delay_seconds: float = Field(60.0, ge=0)
    # kubernetes mode's images: the worker (docker/worker.Dockerfile: no vLLM, for pods that call a model service), and
    # vLLM with the worker (docker/worker-vllm.Dockerfile, on vLLM's CUDA image: pods that run vLLM, the run's own server)
    worker_image: str = "vqa-worker:latest"
    vllm_image: str = "vqa-worker-vllm:latest"
    namespace: str | None = None
    # this Airflow installation's name among those that share a namespace: the run servers' names and owners derive from it
    installation: str = Field("airflow", pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
    # how many run servers (VQA_MODEL_SERVER=run) of the installation hold a GPU at once (0: no bound); a setup waits its
    # turn, oldest first. And how long one may live before the janitor deletes it, whatever its run's state
    max_run_servers: int = Field(4, ge=0)
    run_server_max_hours: float = Field(48.0, gt=0)
    # the deployment's defaults for every DAG's pods (placement.PodSettings' fields, as a JSON object): the service account,
    # s3_secret (null for IRSA), pull secrets, node selector, tolerations, timeouts, the XCom sidecar's image, env ...
    pod_defaults: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    # tag each published dataset's asset event with its run's date (ds): for partition-aware consumers only
    asset_partitions: bool = False
    # scripts/demo.py's working folder (default: .demo in the repository)
    demo_dir: str | None = None

    @field_validator("execution", "model_server", mode="before")
    @classmethod
    def _lowered(cls, value: Any) -> Any:
        return _lower(value)

    @field_validator("pod_defaults", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        import json

        try:
            found = json.loads(value)
        except json.JSONDecodeError:
            found = None
        if not isinstance(found, dict):
            raise ValueError(
                'a JSON object of PodSettings fields, e.g. {"s3_secret": null, "service_account_name": "vqa-worker"}'
            )
        return found

    @field_validator("data_root")
    @classmethod
    def _data_root(cls, root: str | None) -> str | None:
        if root is not None and (not DATA_ROOT.fullmatch(root) or any(part in (".", "..") for part in root.split("/"))):
            raise ValueError(
                "an absolute folder or s3://bucket[/prefix] (a bucket name of 3 to 63 characters), without . or .. segments"
            )
        return root

    def task_timeout(self, rows: int | None) -> int | None:
        """Seconds a worker task over a shard of ``rows`` rows may run; None without a limit, or for a task over no shard."""
        if not self.task_timeout_seconds or rows is None:
            return None
        return self.task_timeout_seconds + int(self.task_seconds_per_row * rows)


def environment() -> Environment:
    """The ``VQA_*`` variables as they are now; a ConfigError names each bad one."""
    try:
        return Environment()
    except ValidationError as err:
        raise ConfigError("; ".join(explain(e) for e in err.errors())) from None


def explain(error: Any, field_name: str | None = None) -> str:
    """``VQA_MAX_NUM_SEQS must be an integer, got 'lots'``: the error of the variable of ``field_name`` (default: the error's)."""
    field_name = field_name or (str(error["loc"][0]) if error["loc"] else "?")
    kind = error["type"]
    if kind in ("int_parsing", "int_type", "int_from_float"):
        what = "an integer"
    elif kind in ("float_parsing", "float_type"):
        what = "a number"
    elif kind == "value_error":
        what = str(error["ctx"]["error"])
    elif kind == "literal_error":
        what = f"{error['ctx']['expected']} (the {field_name.replace('_', ' ')})"
    else:
        what = str(error["msg"]).removeprefix("Input should be ")
    return f"{PREFIX}{field_name.upper()} must be {what}, got {error.get('input')!r}"


def variable(name: str) -> str | None:
    """A variable named by the caller: the API key's (``API_KEY_ENV``, or the seeds' ``key_name_of_api_key``); None if unset or empty."""
    return os.environ.get(name) or None


def worker_settings() -> list[str]:
    """The fields marked ``WORKER``: what a worker reads from the deployment."""
    return [name for name, info in Environment.model_fields.items() if is_worker_setting(info)]


def worker_env() -> dict[str, str]:
    """Each worker setting set in this process's environment, as ``VQA_<NAME>`` -> its value: what a worker pod gets.

    Checked first (a bad value is a ConfigError that names it, on the Airflow side rather than in every pod),
    then passed on as written.
    """
    environment()
    wanted = {PREFIX + name.upper() for name in worker_settings()}
    return {key.upper(): value for key, value in sorted(os.environ.items()) if key.upper() in wanted and value}


def variables() -> list[str]:
    """Every ``VQA_*`` variable this package reads."""
    return sorted([API_KEY_ENV, *(PREFIX + name.upper() for name in Environment.model_fields)])
