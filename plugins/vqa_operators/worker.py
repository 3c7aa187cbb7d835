"""The worker: ``python -m vqa_operators run <generator> --input URI --output URI [...]``.

The one entry point that a Kubernetes pod runs and that an in-process Airflow task calls
(``run_job``). Every input line ends in exactly one place: the output JSONL (input fields +
generated fields + provenance) or the errors JSONL (input + reason). Both files are written
atomically at the end. The last stdout line is a JSON manifest. Job-level failures exit non-zero
with a one-line message, so that Airflow retries the task.

Finished rows are checkpointed as the run goes (``storage/checkpoint.py``). A rerun of the same
task with the same settings reuses them and sends only the other rows to the model; the manifest
reports ``rows_reused``. A rerun after full success makes no model call and writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from vqa_operators.exceptions import ConfigError, InputError, JobError
from vqa_operators.generators import GENERATORS, generator_class
from vqa_operators.generators.base import Generator, RowOutcome, row_key, run_rows
from vqa_operators.media import DEFAULT_MAX_PIXELS, MediaReader, allowed_roots_from_env, within
from vqa_operators.parsing import describe_validation_error
from vqa_operators.serving.base import VLMServing
from vqa_operators.sharding import Shard
from vqa_operators.storage.checkpoint import Checkpoint, checkpoint_prefix, fingerprint
from vqa_operators.storage.jsonl import BadLine, JsonlWriter, read_jsonl
from vqa_operators.storage.uris import Storage, errors_uri_for

log = logging.getLogger("vqa_operators.worker")

PROVENANCE_KEY = "vqa_provenance"
# the model server's batch size (vLLM's --max-num-seqs); the default request concurrency derives from it
MAX_NUM_SEQS_ENV = "VQA_MAX_NUM_SEQS"
VLLM_MAX_NUM_SEQS = 256
BACKEND_ENV = "VQA_BACKEND"
# bump when the checkpoint record format changes, so old checkpoints are not reused
CHECKPOINT_FORMAT = 1


class JobOptions(BaseModel):
    """Everything one worker run needs; validated before any model call."""

    model_config = ConfigDict(extra="forbid")

    generator: str
    # None: the shard's input (the file the plan split)
    input: str | None = Field(None, min_length=1)
    output: str = Field(min_length=1)
    errors: str | None = None
    # "openai": an OpenAI-compatible server (vLLM); "transformers": a model on this machine's CPU (the demo)
    backend: Literal["openai", "transformers"] = Field(default_factory=lambda: (os.environ.get(BACKEND_ENV) or "openai").strip().lower(), validate_default=True)
    base_url: str | None = None
    model: str | None = Field(default_factory=lambda: os.environ.get("VQA_MODEL") or None)
    api_key: SecretStr | None = None
    # requests in flight; None = derived from the server's batch size (default_concurrency)
    concurrency: int | None = Field(None, ge=1, le=4096)
    max_num_seqs: int = Field(default_factory=lambda: _env_int(MAX_NUM_SEQS_ENV, VLLM_MAX_NUM_SEQS), ge=1, le=65536)
    seed: int | None = None
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=16, le=65536)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=28 * 28, le=50_000_000)
    media_root: str = "."
    # where rows may read media from; a deployment setting, not a run parameter
    allowed_media_roots: list[str] | None = Field(default_factory=lambda: allowed_roots_from_env() or None)
    params: dict[str, Any] = Field(default_factory=dict)
    serve_vllm: bool = False
    request_timeout: float = Field(300.0, gt=0)
    max_retries: int = Field(5, ge=0, le=20)
    max_consecutive_failures: int = Field(10, ge=1, le=10_000)
    task_key: str | None = None
    checkpoint_every: int = Field(64, ge=1, le=100_000)
    checkpoint_seconds: float = Field(30.0, gt=0)
    # one shard of the input (from plan_shards); None = the whole input
    shard: Shard | None = None
    # which Airflow try this is (logged and kept in the manifest); None outside Airflow
    try_number: int | None = Field(None, ge=1)

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
    def in_flight(self) -> int:
        """Requests kept in flight: ``concurrency`` if set, else derived from ``max_num_seqs``."""
        return self.concurrency or default_concurrency(self.max_num_seqs)

    @property
    def errors_uri(self) -> str:
        """The errors file: ``--errors`` or ``<output name>.errors.jsonl`` beside the output."""
        return self.errors or errors_uri_for(self.output)


def default_concurrency(max_num_seqs: int) -> int:
    """Requests in flight for a server that batches ``max_num_seqs``: a quarter more, so a freed slot never waits for the client."""
    return max_num_seqs + max(1, max_num_seqs // 4)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


class Progress:
    """Counts of one try, and the progress line logged after each batch of rows."""

    def __init__(self, name: str, total: int | None, batch: int) -> None:
        self.name = name
        self.total = total
        self.batch = max(1, batch)
        self.started = time.monotonic()
        self.done = self.reused = self.out = 0
        # rows this try finished and checkpointed, in any order (a row may finish before one ahead of it)
        self.finished = 0
        self.reasons: Counter[str] = Counter()

    @property
    def failed(self) -> int:
        """Rows sent to the errors file so far."""
        return sum(self.reasons.values())

    def add(self, record: dict[str, Any], reused: bool) -> None:
        """Count one finished row (in input order)."""
        self.done += 1
        self.reused += reused
        if "error" in record:
            self.reasons[record["error"]["reason"]] += 1
        else:
            self.out += 1

    def due(self) -> bool:
        """Whether a batch has just completed (or the last row)."""
        return self.done % self.batch == 0 or self.done == self.total

    def line(self, usage: Any) -> str:
        """``image_qa: 640/10000 rows (6.4%), 12.3 rows/s, 1,234,567 tokens (in 1,100,000, out 134,567), ETA 12m40s, 3 failed {...}, 128 reused``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        fresh = self.done - self.reused
        rate = fresh / elapsed
        of = f"/{self.total} rows ({100 * self.done / self.total:.1f}%)" if self.total else " rows"
        if not self.total:
            eta = "ETA unknown"
        elif self.done >= self.total:
            eta = "ETA 0s"
        elif rate > 0:
            eta = f"ETA {_duration((self.total - self.done) / rate)}"
        else:
            eta = "ETA unknown"
        tokens = usage.prompt_tokens + usage.completion_tokens
        failures = f"{self.failed} failed" + (f" {dict(sorted(self.reasons.items()))}" if self.reasons else "")
        return (
            f"{self.name}: {self.done}{of}, {rate:.1f} rows/s, {tokens:,} tokens (in {usage.prompt_tokens:,}, out {usage.completion_tokens:,}), "
            f"{eta}, {failures}, {self.reused} reused"
        )

    def snapshot(self) -> dict[str, Any]:
        """What a failed try had done: attached to its exception for the failure callback."""
        return {
            "rows_total": self.total, "rows_done": self.done, "rows_finished": self.finished, "rows_reused": self.reused,
            "rows_failed": self.failed, "failures_by_reason": dict(sorted(self.reasons.items())),
        }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_batch(total: int | None, in_flight: int) -> int:
    """Rows per progress line: a window of requests, or a twentieth of the shard if that is smaller."""
    return min(in_flight, -(-total // 20)) if total else in_flight


def _provenance(generator: Generator, prior: Any, key: str, meta: dict[str, Any]) -> dict[str, Any]:
    merged = dict(prior) if isinstance(prior, dict) else {}
    merged[generator.name] = {**generator.provenance(), "row_key": key, **meta}
    return merged


def record_key(line: int, item: dict[str, Any] | BadLine) -> str:
    """A row's stable key within its input: line number and content hash (an edited or moved row is new)."""
    if isinstance(item, BadLine):
        return f"{line}:bad:{hashlib.sha256(item.raw.encode('utf-8', 'replace')).hexdigest()[:20]}"
    return f"{line}:{row_key(item)}"


def _record(generator: Generator, outcome: RowOutcome) -> dict[str, Any]:
    """The row's final record: ``{"out": output row}`` or ``{"error": errors-file entry}``."""
    if outcome.error is not None:
        return {"error": outcome.error_entry(generator.name)}
    assert outcome.row is not None and outcome.fields is not None
    row = generator.finish_row(outcome.row, outcome.fields)
    row[PROVENANCE_KEY] = _provenance(generator, outcome.row.get(PROVENANCE_KEY), row_key(outcome.row), outcome.meta)
    return {"out": row}


def settings_fingerprint(generator: Generator, opts: JobOptions) -> str:
    """What decides each row's result: generator, options, prompts, model, sampling and image budget."""
    return fingerprint(
        {"format": CHECKPOINT_FORMAT, "generator": generator.name, **generator.provenance(), "max_pixels": opts.max_pixels, "media_root": opts.media_root}
    )


async def _process(generator: Generator, storage: Storage, opts: JobOptions) -> dict[str, Any]:
    assert opts.input is not None
    settings = settings_fingerprint(generator, opts)
    checkpoint = Checkpoint(
        storage, checkpoint_prefix(opts.output, opts.task_key, settings), every_rows=opts.checkpoint_every, every_seconds=opts.checkpoint_seconds
    )
    keys: dict[int, str] = {}

    # the shard's byte range, if the input is the file that was split (a later stage reads its own file whole)
    shard = opts.shard if opts.shard and opts.shard.input == opts.input else None
    lines = storage.iter_lines(opts.input, start=shard.start, end=shard.end, version=shard.version) if shard else storage.iter_lines(opts.input)
    # a later stage's input is the upstream shard's output, which may hold fewer rows: its total is unknown
    total = shard.rows if shard else None
    progress = Progress(generator.name, total, progress_batch(total, opts.in_flight))

    def items() -> Any:
        for line, item in read_jsonl(lines, first_line=shard.first_line if shard else 1):
            key = keys[line] = record_key(line, item)
            done = checkpoint.get(key)
            yield line, (item if done is None else RowOutcome(line=line, row=None, record=done, reused=True))

    def finished(outcome: RowOutcome) -> None:
        # checkpointed as soon as the row finishes, even if rows before it are still running
        outcome.record = _record(generator, outcome)
        checkpoint.add(keys[outcome.line], outcome.record)
        progress.finished += 1

    try:
        loaded = checkpoint.load()
        if loaded or (opts.try_number or 1) > 1:
            log.info("%s: %s%d rows finished by earlier tries will be reused (checkpoint %s)", generator.name, opts.attempt, loaded, checkpoint.prefix)
        await generator.serving.check()
        with storage.open_atomic(opts.output) as out_file, storage.open_atomic(opts.errors_uri) as err_file:
            out, err = JsonlWriter(out_file), JsonlWriter(err_file)
            try:
                async for outcome in run_rows(generator, items(), window=2 * opts.in_flight, on_finished=finished):
                    del keys[outcome.line]
                    record = outcome.record
                    assert record is not None
                    progress.add(record, outcome.reused)
                    if "error" in record:
                        err.write(record["error"])
                    else:
                        out.write(record["out"])
                    if progress.due():
                        log.info("%s", progress.line(generator.usage))
                if shard is not None and progress.done != shard.rows:
                    raise InputError(f"shard {shard.index} of {opts.input} has {progress.done} rows, not the {shard.rows} planned: the input changed")
            finally:
                # whatever happens, keep the rows this try finished for the next one
                checkpoint.flush()
    except Exception as exc:
        # what this try had done, for the failure callback's one-line summary
        exc.progress = progress.snapshot()  # type: ignore[attr-defined]
        raise
    finally:
        checkpoint.close()
        await generator.serving.aclose()
    usage = generator.usage
    return {
        "generator": generator.name,
        "input": opts.input,
        "shard": opts.shard.index if opts.shard else None,
        "try_number": opts.try_number,
        "output": opts.output,
        "errors": opts.errors_uri,
        "rows_in": progress.done,
        "rows_out": progress.out,
        "rows_failed": progress.failed,
        "rows_reused": progress.reused,
        "failures_by_reason": dict(sorted(progress.reasons.items())),
        "model": generator.serving.model_name,
        "prompt_sha256": generator.prompts.sha256,
        "seed": opts.seed,
        "checkpoint": checkpoint.prefix,
        "requests": usage.requests,
        "repairs": usage.repairs,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "duration_s": round(time.monotonic() - progress.started, 3),
    }


def check_options(opts: JobOptions) -> type[Generator]:
    """What can be checked before reading anything: the generator, its options, the locations; ConfigError if bad."""
    cls = generator_class(opts.generator)
    cls.parse_options(opts.params)
    if opts.output in (opts.input, opts.errors_uri) or opts.input == opts.errors_uri:
        raise ConfigError("--input, --output and --errors must be three different locations")
    if opts.allowed_media_roots and not any(within(opts.media_root, root) for root in opts.allowed_media_roots):
        raise ConfigError(f"media root {opts.media_root!r} is outside the allowed media roots (VQA_ALLOWED_MEDIA_ROOTS)")
    return cls


def validate_spec(options: dict[str, Any], input_uri: str) -> JobOptions:
    """A worker's options (``WorkerSpec.options()``) checked as its run would check them, without any I/O."""
    try:
        opts = JobOptions(**{**options, "input": options.get("input") or input_uri})
    except ValidationError as err:
        raise ConfigError(f"{options.get('generator')}: {describe_validation_error(err)}") from None
    check_options(opts)
    return opts


def run_job(opts: JobOptions, *, storage: Storage | None = None, serving: VLMServing | None = None) -> dict[str, Any]:
    """Run one generator over one input file and return the manifest; raise JobError for job-level failures."""
    storage = storage or Storage()
    # one INFO line per HTTP request would drown the task log; progress lines report instead
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cls = check_options(opts)
    with contextlib.ExitStack() as stack:
        base_url = opts.base_url
        if serving is None and opts.backend == "transformers":
            from vqa_operators.serving.transformers_local import DEFAULT_CPU_MODEL, LocalModelVLMServing_transformers

            serving = LocalModelVLMServing_transformers(
                opts.model or DEFAULT_CPU_MODEL, temperature=opts.temperature, top_p=opts.top_p, max_tokens=opts.max_tokens, seed=opts.seed
            )
        if serving is None:
            if not opts.model:
                raise ConfigError("no model name: pass --model or set VQA_MODEL (or the vqa_vlm connection's extra.model)")
            if opts.serve_vllm:
                from vqa_operators.serving.vllm_server import serve_vllm

                base_url = stack.enter_context(serve_vllm(opts.model, max_num_seqs=opts.max_num_seqs))
            if not base_url:
                raise ConfigError("no model server: pass --base-url or set VQA_BASE_URL (an OpenAI-compatible /v1 URL, e.g. vllm serve)")
            from vqa_operators.serving.openai_api import APIVLMServing_openai

            serving = APIVLMServing_openai(
                api_url=base_url,
                model_name=opts.model,
                max_workers=opts.in_flight,
                api_key=opts.api_key.get_secret_value() if opts.api_key else None,
                temperature=opts.temperature,
                top_p=opts.top_p,
                max_tokens=opts.max_tokens,
                seed=opts.seed,
                timeout=opts.request_timeout,
                max_retries=opts.max_retries,
                max_consecutive_failures=opts.max_consecutive_failures,
            )
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="vqa-media"))
        media = MediaReader(storage, media_root=opts.media_root, max_pixels=opts.max_pixels, executor=executor, allowed_roots=opts.allowed_media_roots)
        generator = cls(serving, options=opts.params, media=media, seed=opts.seed)
        log.info("%s: %s -> %s (model %s, concurrency %d)", cls.name, opts.input, opts.output, serving.model_name, serving.max_concurrency)
        manifest = asyncio.run(_process(generator, storage, opts))
    log.info(
        "%s: %s%d rows in, %d out, %d failed %s, %d reused from earlier tries, %d model requests",
        manifest["generator"], opts.attempt, manifest["rows_in"], manifest["rows_out"],
        manifest["rows_failed"], manifest["failures_by_reason"], manifest["rows_reused"], manifest["requests"],
    )
    return manifest


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    """The CLI: ``run <generator>`` with URIs, model endpoint and sampling options."""
    parser = argparse.ArgumentParser(prog="python -m vqa_operators", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one generator over a JSONL file")
    run.add_argument("generator", choices=sorted(GENERATORS))
    run.add_argument("--input", help="input JSONL: a path or s3://bucket/key (default: the --shard's input)")
    run.add_argument("--output", required=True, help="output JSONL: a path or s3://bucket/key")
    run.add_argument("--errors", help="errors JSONL (default: <output name>.errors.jsonl)")
    run.add_argument(
        "--backend", choices=["openai", "transformers"],
        help="openai: an OpenAI-compatible server such as vllm serve (default); transformers: the model on this machine's CPU [VQA_BACKEND]",
    )
    run.add_argument("--base-url", default=os.environ.get("VQA_BASE_URL"), help="OpenAI-compatible /v1 URL [VQA_BASE_URL]")
    run.add_argument("--model", help="served model name, or a Hub id / local folder for --backend transformers [VQA_MODEL]")
    run.add_argument(
        "--concurrency", type=int, default=_env_int("VQA_CONCURRENCY", 0) or None,
        help="requests in flight (default: --max-num-seqs and a quarter) [VQA_CONCURRENCY]",
    )
    run.add_argument(
        "--max-num-seqs", type=int, help=f"the model server's batch size, vLLM's --max-num-seqs (default {VLLM_MAX_NUM_SEQS}) [{MAX_NUM_SEQS_ENV}]"
    )
    run.add_argument("--seed", type=int, default=None, help="sampling seed; per-row seeds derive from it")
    run.add_argument("--temperature", type=float, default=0.7)
    run.add_argument("--top-p", type=float, default=0.9)
    run.add_argument("--max-tokens", type=int, default=1024, help="completion token limit (video QA needs ~4096)")
    run.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="pixel budget per image")
    run.add_argument("--media-root", default=os.environ.get("VQA_MEDIA_ROOT", "."), help="folder or s3:// prefix for relative image paths [VQA_MEDIA_ROOT]")
    run.add_argument("--param", dest="params", type=_param, action="append", default=[], metavar="KEY=VALUE", help="generator option, e.g. pairs_per_row=5")
    run.add_argument(
        "--allowed-media-root", dest="allowed_media_roots", action="append",
        help="folder or s3://bucket[/prefix] rows may read media from; repeatable (default: the media root) [VQA_ALLOWED_MEDIA_ROOTS, comma-separated]",
    )
    run.add_argument("--max-retries", type=int, default=5, help="HTTP retries per request (backoff with jitter)")
    run.add_argument("--max-consecutive-failures", type=int, default=10, help="fail fast after this many failed requests in a row (server down)")
    run.add_argument("--task-key", help="the task's identity (dag/task/run/map index): names the checkpoint")
    run.add_argument("--checkpoint-every", type=int, default=64, help="checkpoint after this many finished rows")
    run.add_argument("--checkpoint-seconds", type=float, default=30.0, help="... or after this many seconds")
    run.add_argument("--shard", type=json.loads, help="one shard of the input, as JSON (what the DAG's plan task returns)")
    run.add_argument("--try-number", type=int, help="the Airflow try this run is (logged, and kept in the manifest)")
    run.add_argument("--request-timeout", type=float, default=300.0, help="seconds per HTTP request")
    run.add_argument(
        "--serve-vllm", action="store_true",
        help="start vLLM's server on MODEL here, use it, and stop it [VQA_VLLM_COMMAND, VQA_VLLM_ARGS, VQA_VLLM_PORT]",
    )
    run.add_argument("--xcom-file", default=os.environ.get("VQA_XCOM_FILE"), help="also write the manifest here (KubernetesPodOperator XCom)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        try:
            # what was not given is left to JobOptions, whose defaults read the environment
            # (a template that rendered empty, such as --model "" from an unset param, counts as not given)
            fields = {k: v for k, v in vars(args).items() if k in JobOptions.model_fields and v not in (None, "")}
            opts = JobOptions(**{**fields, "params": dict(args.params)}, api_key=os.environ.get("VQA_API_KEY") or None)
        except ValidationError as err:
            raise ConfigError(f"bad options: {describe_validation_error(err)}") from None
        manifest = run_job(opts)
    except JobError as err:
        print(f"vqa_operators: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    line = json.dumps(manifest, sort_keys=True)
    if args.xcom_file:
        os.makedirs(os.path.dirname(args.xcom_file) or ".", exist_ok=True)
        with open(args.xcom_file, "w", encoding="utf-8") as handle:
            handle.write(line)
    print(line, flush=True)
    return 0
