"""What one worker run is given (``JobOptions``), checked before any I/O or model call: the one declaration of a worker option.

Each field carries its default, bounds and description. From the fields come the worker's CLI
(``cli.build_parser``: a flag per field, ``--max-num-seqs`` for ``max_num_seqs``), the pod's
arguments (``argv``), the DAG params that expose an option (``dag_config.option_param``) and, for a
field marked ``settings.WORKER``, its ``VQA_*`` variable: an option the caller does not give takes
its variable, else its default. An option given explicitly, even as None, is the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError
from vqa_operators.generators import generator_class
from vqa_operators.generators.base import Generator
from vqa_operators.media import readable_roots
from vqa_operators.parsing import describe_validation_error
from vqa_operators.records import Shard
from vqa_operators.storage.uris import errors_uri_for, rejected_uri_for, within

# a field that is no CLI flag: the generator (the command's positional argument), the API key (never on a command line)
POSITIONAL: dict[str, Any] = {"cli": "positional"}
NO_FLAG: dict[str, Any] = {"cli": False}


class WorkerVariables(EnvSettingsSource):
    """The ``VQA_*`` variables of the fields marked ``settings.WORKER``, each checked alone, so that a bad one is a ConfigError
    naming the variable rather than a validation error of the options."""

    def __call__(self) -> dict[str, Any]:
        found = {}
        for name, value in super().__call__().items():
            info = self.settings_cls.model_fields.get(name)
            if info is None or not settings.is_worker_setting(info):
                continue
            try:
                TypeAdapter(info.rebuild_annotation()).validate_python(value)
            except ValidationError as err:
                raise ConfigError("; ".join(settings.explain(e, name) for e in err.errors())) from None
            found[name] = value
        return found


class JobOptions(settings.WorkerSettings):
    """Everything one worker run needs; validated before any model call. The fields it shares with the deployment's
    settings (the model server, the media root, the allowed roots) are ``settings.WorkerSettings``'."""

    model_config = SettingsConfigDict(extra="forbid")

    generator: str = Field(json_schema_extra=POSITIONAL, description="the generator to run")
    input: str | None = Field(
        None, min_length=1, description="input JSONL: a path or s3://bucket/key (default: the shard's input)"
    )
    output: str = Field(min_length=1, description="output JSONL: a path or s3://bucket/key")
    errors: str | None = Field(None, description="errors JSONL (default: <output name>.errors.jsonl)")
    api_key: SecretStr | None = Field(
        None, json_schema_extra=NO_FLAG, description="the model server's key (default: VQA_API_KEY)"
    )
    seed: int | None = Field(
        None,
        ge=0,
        title="Sampling seed",
        description="Per-row seeds (and choices such as pers_qa's question) derive from it, so reruns ask the same way.",
    )
    temperature: float = Field(settings.TEMPERATURE, ge=0.0, le=2.0, description="sampling temperature")
    top_p: float = Field(settings.TOP_P, gt=0.0, le=1.0, description="nucleus sampling's top_p")
    max_tokens: int | None = Field(
        None,
        ge=16,
        le=65536,
        description=f"completion token limit (default: the generator's own, {settings.MAX_TOKENS}; video QA's stages 4096)",
    )
    max_pixels: int = Field(settings.MAX_PIXELS, ge=28 * 28, le=50_000_000, description="pixel budget per image")
    staging_root: str | None = Field(
        None,
        description="the run's staging folder or s3:// prefix: media an earlier task of the run wrote there (the video ingest's frames) may be read",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="generator option, e.g. pairs_per_row=5")
    serve_vllm: bool = Field(
        False,
        description="start vLLM's server on MODEL here, use it, and stop it [VQA_VLLM_COMMAND, VQA_VLLM_ARGS, VQA_VLLM_PORT]",
    )
    request_timeout: float = Field(settings.REQUEST_TIMEOUT_S, gt=0, description="seconds per HTTP request")
    max_retries: int = Field(settings.MAX_RETRIES, ge=0, le=20, description="HTTP retries per request, backoff with jitter")
    max_consecutive_failures: int = Field(
        settings.MAX_CONSECUTIVE_FAILURES,
        ge=1,
        le=10_000,
        description="fail fast after this many failed requests in a row: the server is down",
    )
    task_key: str | None = Field(None, description="the task's identity (dag/task/run/map index): names the checkpoint")
    checkpoint_every: int = Field(
        settings.CHECKPOINT_EVERY, ge=1, le=100_000, description="checkpoint after this many finished rows"
    )
    checkpoint_seconds: float = Field(settings.CHECKPOINT_SECONDS, gt=0, description="... or after this many seconds")
    shard: Shard | None = Field(
        None, description="one shard of the input, as JSON (what the DAG's plan task returns; default: the whole input)"
    )
    try_number: int | None = Field(None, ge=1, description="the Airflow try this run is (logged, and kept in the manifest)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """What the caller gives, then the variables of the ``WORKER`` fields: no other field is ever read from the environment."""
        return init_settings, WorkerVariables(settings_cls)

    @field_validator("shard", mode="before")
    @classmethod
    def _shard_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _input_from_shard(self) -> JobOptions:
        if self.input is None:
            if self.shard is None:
                raise ValueError("input: give --input, or a --shard whose input is read")
            self.input = self.shard.input
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

    @classmethod
    def flags(cls) -> dict[str, FieldInfo]:
        """The fields that are CLI flags, by flag: ``--max-num-seqs``; a list's or a mapping's in the singular, repeated
        (``--allowed-media-root``, ``--param KEY=VALUE``)."""
        return {flag_of(name, info): info for name, info in cls.model_fields.items() if cli_kind(info) is True}


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


def job_options(values: Mapping[str, Any], *, what: str = "bad options", **given: Any) -> JobOptions:
    """``JobOptions`` of ``values`` and ``given`` (which win): the one typed conversion of what a form, a template or a command
    line gave. A value of None or "" is not given (it takes its variable, else its default). ConfigError if one is bad."""
    data = {name: value for name, value in {**values, **given}.items() if value is not None and value != ""}
    try:
        return JobOptions(**data)
    except ValidationError as err:
        raise ConfigError(f"{what}: {describe_validation_error(err)}") from None


def validate_spec(values: Mapping[str, Any], input_uri: str) -> JobOptions:
    """A worker's options (``WorkerSpec.values``, resolved) checked as its run would check them, without any I/O."""
    opts = job_options(values, what=str(values.get("generator")), input=values.get("input") or input_uri)
    check_options(opts)
    return opts


def cli_kind(info: FieldInfo) -> bool | str:
    """True for a flag, ``"positional"`` for the command's argument, False for a field no command line carries."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("cli", True)  # type: ignore[return-value]


# how a field is written on a command line: a switch alone, a list's items or a mapping's KEY=VALUE pairs each with the
# flag repeated, a model as JSON, any other value as its text
Form = Literal["switch", "list", "mapping", "model", "value"]


def form_of(info: FieldInfo) -> Form:
    """How ``info``'s field is written on a command line, from its annotation (``X | None`` as ``X``)."""
    if info.annotation is bool:
        return "switch"
    for kind in (info.annotation, *get_args(info.annotation)):
        origin = get_origin(kind) or kind
        if isinstance(origin, type) and issubclass(origin, BaseModel):
            return "model"
        if origin is list:
            return "list"
        if origin is dict:
            return "mapping"
    return "value"


def flag_of(name: str, info: FieldInfo) -> str:
    """The field's flag: its name in kebab case, in the singular where it repeats."""
    return "--" + (name.removesuffix("s") if form_of(info) in ("list", "mapping") else name).replace("_", "-")


def argv(values: Mapping[str, Any], model: type[JobOptions] = JobOptions) -> list[str]:
    """``run <generator> --flag value ...`` for ``python -m vqa_operators``: the options in ``values`` that are given, each as its
    flag (a True switch alone; a list's items and a mapping's ``KEY=VALUE`` pairs each with their flag; a model as JSON)."""
    args = ["run", str(values["generator"])]
    # the run's own options first (input and output lead), then those it shares with the deployment's settings
    for name in sorted(model.model_fields, key=lambda name: name in settings.WorkerSettings.model_fields):
        info, value = model.model_fields[name], values.get(name)
        if cli_kind(info) is not True or value is None or value == "" or value is False:
            continue
        flag, form = flag_of(name, info), form_of(info)
        if form == "switch":
            args.append(flag)
        elif form == "model":
            args += [flag, json.dumps(value.model_dump() if isinstance(value, BaseModel) else value, sort_keys=True)]
        elif form == "mapping":
            args += [
                part
                for key, item in value.items()
                for part in (flag, f"{key}={item if isinstance(item, str) else json.dumps(item)}")
            ]
        elif form == "list":
            args += [part for item in value for part in (flag, str(item))]
        else:
            args += [flag, str(value)]
    return args
