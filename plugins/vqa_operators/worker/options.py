"""What one worker run is given (``JobOptions``), checked before any I/O or model call.

An option the caller does not pass takes its ``VQA_*`` variable (``settings.environment()``), else
its default from ``settings``. An option passed explicitly, even as None, is the caller's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError
from vqa_operators.generators import generator_class
from vqa_operators.generators.base import Generator
from vqa_operators.media import readable_roots
from vqa_operators.parsing import describe_validation_error
from vqa_operators.records import Shard
from vqa_operators.storage.uris import errors_uri_for, rejected_uri_for, within

# the options whose default is a VQA_* variable: option name -> Environment field
FROM_ENVIRONMENT = (
    "backend", "base_url", "model", "concurrency", "max_num_seqs", "media_root", "allowed_media_roots", "allowed_input_roots", "allowed_output_roots",
)


class JobOptions(BaseModel):
    """Everything one worker run needs; validated before any model call."""

    model_config = ConfigDict(extra="forbid")

    generator: str
    # None: the shard's input (the file the plan split)
    input: str | None = Field(None, min_length=1)
    output: str = Field(min_length=1)
    errors: str | None = None
    # "openai": an OpenAI-compatible server (vLLM); "transformers": a model on this machine's CPU (the demo)
    backend: Literal["openai", "transformers"] = "openai"
    base_url: str | None = None
    model: str | None = None
    # None: the client reads VQA_API_KEY
    api_key: SecretStr | None = None
    # requests in flight; None = derived from the server's batch size (settings.default_concurrency)
    concurrency: int | None = Field(None, ge=1, le=4096)
    max_num_seqs: int = Field(settings.MAX_NUM_SEQS, ge=1, le=65536)
    seed: int | None = None
    temperature: float = Field(settings.TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(settings.TOP_P, gt=0.0, le=1.0)
    # None: the generator's own (Generator.max_tokens)
    max_tokens: int | None = Field(None, ge=16, le=65536)
    max_pixels: int = Field(settings.MAX_PIXELS, ge=28 * 28, le=50_000_000)
    media_root: str = "."
    # where rows may read media from, the input may be read and the output written; deployment settings, not run parameters
    allowed_media_roots: list[str] | None = None
    allowed_input_roots: list[str] | None = None
    allowed_output_roots: list[str] | None = None
    # the run's staging folder: media an earlier task of the run wrote there (the video ingest's frames) may be read too
    staging_root: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    serve_vllm: bool = False
    request_timeout: float = Field(settings.REQUEST_TIMEOUT_S, gt=0)
    max_retries: int = Field(settings.MAX_RETRIES, ge=0, le=20)
    max_consecutive_failures: int = Field(settings.MAX_CONSECUTIVE_FAILURES, ge=1, le=10_000)
    task_key: str | None = None
    checkpoint_every: int = Field(settings.CHECKPOINT_EVERY, ge=1, le=100_000)
    checkpoint_seconds: float = Field(settings.CHECKPOINT_SECONDS, gt=0)
    # one shard of the input (from plan_shards); None = the whole input
    shard: Shard | None = None
    # which Airflow try this is (logged and kept in the manifest); None outside Airflow
    try_number: int | None = Field(None, ge=1)

    def __init__(self, **data: Any) -> None:
        # read here, not in a validator: a bad variable is a ConfigError naming it, not a validation error of the options
        if not all(name in data for name in FROM_ENVIRONMENT):
            env = settings.environment()
            data = {**{name: getattr(env, name) for name in FROM_ENVIRONMENT if name not in data}, **data}
        super().__init__(**data)

    @model_validator(mode="after")
    def _input_from_shard(self) -> JobOptions:
        if self.input is None:
            if self.shard is None:
                raise ValueError("input: give --input, or a --shard whose input is read")
            self.input = self.shard.input
        self.allowed_media_roots = self.allowed_media_roots or None
        self.allowed_input_roots = self.allowed_input_roots or None
        self.allowed_output_roots = self.allowed_output_roots or None
        return self

    @property
    def attempt(self) -> str:
        """``"try 2: "`` to prefix log lines with, or nothing outside Airflow."""
        return f"try {self.try_number}: " if self.try_number else ""

    @property
    def sharing(self) -> int:
        """How many tasks send to this run's server at once: the plan's shards, unless the worker serves its own vLLM."""
        return self.shard.shards if self.shard is not None and not self.serve_vllm else 1

    @property
    def effective_concurrency(self) -> int:
        """Requests kept in flight: ``concurrency`` if set, else the server's budget (``max_num_seqs`` and a quarter)
        split between the shards that share it."""
        return settings.effective_concurrency(self.concurrency, self.max_num_seqs, self.sharing)

    @property
    def media_roots(self) -> list[str]:
        """Where rows may read media from: the allowed roots (default: the media root), and the run's staging folder."""
        return readable_roots(self.media_root, self.allowed_media_roots, self.staging_root)

    @property
    def errors_uri(self) -> str:
        """The errors file: ``--errors`` or ``<output name>.errors.jsonl`` beside the output."""
        return self.errors or errors_uri_for(self.output)

    @property
    def rejected_uri(self) -> str:
        """A quality gate's rejected file: ``<output name>.rejected.jsonl`` beside the output."""
        return rejected_uri_for(self.output)


def check_options(opts: JobOptions) -> type[Generator]:
    """What can be checked before reading anything: the generator, its options, the locations; ConfigError if bad."""
    cls = generator_class(opts.generator)
    cls.parse_options(opts.params)
    if len({opts.input, opts.output, opts.errors_uri, opts.rejected_uri}) != 4:
        raise ConfigError("--input, --output, --errors and the rejected file beside the output must be four different locations")
    if opts.allowed_media_roots and not any(within(opts.media_root, root) for root in opts.allowed_media_roots):
        raise ConfigError(f"media root {opts.media_root!r} is outside the allowed media roots (VQA_ALLOWED_MEDIA_ROOTS)")
    # an earlier stage's staged output, under the run's staging folder, is an input too
    readable = [*(opts.allowed_input_roots or []), *([opts.staging_root] if opts.staging_root else [])]
    if opts.allowed_input_roots and not any(within(str(opts.input), root) for root in readable):
        raise ConfigError("--input is outside the allowed input roots (VQA_ALLOWED_INPUT_ROOTS) and the run's staging folder")
    written = {"--output": opts.output, "--errors": opts.errors_uri, "--staging-root": opts.staging_root}
    for flag, uri in written.items():
        if opts.allowed_output_roots and uri is not None and not any(within(uri, root) for root in opts.allowed_output_roots):
            raise ConfigError(f"{flag} is outside the allowed output roots (VQA_ALLOWED_OUTPUT_ROOTS)")
    return cls


def validate_spec(options: dict[str, Any], input_uri: str) -> JobOptions:
    """A worker's options (``WorkerSpec.options()``) checked as its run would check them, without any I/O."""
    try:
        opts = JobOptions(**{**options, "input": options.get("input") or input_uri})
    except ValidationError as err:
        raise ConfigError(f"{options.get('generator')}: {describe_validation_error(err)}") from None
    check_options(opts)
    return opts
