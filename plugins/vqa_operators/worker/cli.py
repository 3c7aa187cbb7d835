"""``python -m vqa_operators run <generator> ...``: what a pod runs. Exit codes are the JobError classes' ``exit_code``.

An option left out takes its ``VQA_*`` variable, else its default (``settings``); the help text
names both. SIGTERM and SIGINT stop the run cleanly (``run_loop.StopOnSignals``); one that arrives
before the rows start (while ``--serve-vllm`` waits for vLLM, say) stops it at once. Either way
the exit code is 128 + the signal's number, after a one-line message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from pydantic import ValidationError

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError, Interrupted, JobError, UnexpectedError
from vqa_operators.generators import GENERATORS
from vqa_operators.parsing import describe_validation_error
from vqa_operators.worker.options import JobOptions
from vqa_operators.worker.run_loop import run_job
from vqa_operators.worker.signals import STOP_SIGNALS

log = logging.getLogger("vqa_operators.worker")


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
    parser = argparse.ArgumentParser(prog="python -m vqa_operators", description="Run one generator over a JSONL file.")
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
    run.add_argument("--base-url", help="OpenAI-compatible /v1 URL [VQA_BASE_URL]")
    run.add_argument("--model", help="served model name, or a Hub id / local folder for --backend transformers [VQA_MODEL]")
    run.add_argument("--concurrency", type=int, help="requests in flight (default: --max-num-seqs and a quarter) [VQA_CONCURRENCY]")
    run.add_argument(
        "--max-num-seqs", type=int, help=f"the model server's batch size, vLLM's --max-num-seqs (default {settings.MAX_NUM_SEQS}) [VQA_MAX_NUM_SEQS]"
    )
    run.add_argument("--seed", type=int, help="sampling seed; per-row seeds derive from it")
    run.add_argument("--temperature", type=float, help=f"default {settings.TEMPERATURE}")
    run.add_argument("--top-p", type=float, help=f"default {settings.TOP_P}")
    run.add_argument("--max-tokens", type=int, help=f"completion token limit (default: the generator's own, {settings.MAX_TOKENS}; video QA's stages 4096)")
    run.add_argument("--max-pixels", type=int, help=f"pixel budget per image (default {settings.MAX_PIXELS})")
    run.add_argument("--media-root", help="folder or s3:// prefix for relative image paths (default: .) [VQA_MEDIA_ROOT]")
    run.add_argument("--param", dest="params", type=_param, action="append", default=[], metavar="KEY=VALUE", help="generator option, e.g. pairs_per_row=5")
    run.add_argument(
        "--allowed-media-root", dest="allowed_media_roots", action="append",
        help="folder or s3://bucket[/prefix] rows may read media from; repeatable (default: the media root) [VQA_ALLOWED_MEDIA_ROOTS, comma-separated]",
    )
    run.add_argument(
        "--staging-root", help="the run's staging folder or s3:// prefix: media an earlier task of the run wrote there (the video ingest's frames) may be read",
    )
    run.add_argument("--max-retries", type=int, help=f"HTTP retries per request, backoff with jitter (default {settings.MAX_RETRIES})")
    run.add_argument(
        "--max-consecutive-failures", type=int,
        help=f"fail fast after this many failed requests in a row: the server is down (default {settings.MAX_CONSECUTIVE_FAILURES})",
    )
    run.add_argument("--task-key", help="the task's identity (dag/task/run/map index): names the checkpoint")
    run.add_argument("--checkpoint-every", type=int, help=f"checkpoint after this many finished rows (default {settings.CHECKPOINT_EVERY})")
    run.add_argument("--checkpoint-seconds", type=float, help=f"... or after this many seconds (default {settings.CHECKPOINT_SECONDS:g})")
    run.add_argument("--shard", type=json.loads, help="one shard of the input, as JSON (what the DAG's plan task returns)")
    run.add_argument("--try-number", type=int, help="the Airflow try this run is (logged, and kept in the manifest)")
    run.add_argument("--request-timeout", type=float, help=f"seconds per HTTP request (default {settings.REQUEST_TIMEOUT_S:g})")
    run.add_argument(
        "--serve-vllm", action="store_true",
        help="start vLLM's server on MODEL here, use it, and stop it [VQA_VLLM_COMMAND, VQA_VLLM_ARGS, VQA_VLLM_PORT]",
    )
    run.add_argument("--xcom-file", help="also write the manifest here (KubernetesPodOperator XCom) [VQA_XCOM_FILE]")
    smoke = sub.add_parser("smoke", help="check what a worker needs of this pod (vqa_smoke): user, read-only root, data root, model server, cache, GPU")
    smoke.add_argument("--data-root", required=True, help="folder or s3:// prefix to write a probe object under (<root>/smoke/)")
    smoke.add_argument("--name", default="pod", help="this pod's role, in the probe object's name")
    smoke.add_argument("--uid", type=int, required=True, help="the user the pod must run as")
    smoke.add_argument("--model-cache", help="the model cache's folder, which must be writable")
    smoke.add_argument("--gpus", type=int, default=0, help="GPUs requested: each must be a device in /dev")
    smoke.add_argument("--expect-gpu", action="store_true", help="a missing GPU fails the check (else it is reported, not required)")
    smoke.add_argument("--xcom-file", help="also write the verdicts here (KubernetesPodOperator XCom)")
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum), "before any row ran")


def smoke(args: argparse.Namespace) -> int:
    """Run the smoke checks; print a verdict per check; exit 2 (no retry helps) if one failed."""
    from vqa_operators.smoke import run_checks
    from vqa_operators.storage import Storage

    env = settings.environment()
    verdicts = run_checks(
        storage=Storage(), root=args.data_root, name=args.name, expected_uid=args.uid, base_url=env.base_url, model=env.model,
        api_key=settings.variable(settings.API_KEY_ENV), model_cache=args.model_cache, gpus=args.gpus, expect_gpu=args.expect_gpu,
    )
    for verdict in verdicts:
        print(verdict.line(), flush=True)
    failed = [v.check for v in verdicts if v.ok is False]
    write_xcom(args.xcom_file, {"pod": args.name, "ok": not failed, "checks": [v.model_dump() for v in verdicts]})
    if failed:
        print(f"vqa_operators: ConfigError: this pod fails the smoke checks: {', '.join(failed)}", file=sys.stderr, flush=True)
        return ConfigError.exit_code
    return 0


def write_xcom(path: str | None, value: dict[str, Any]) -> None:
    """Write ``value`` as the pod's XCom (the KubernetesPodOperator's sidecar reads it), if a path is given."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(value, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a pod's PID 1 ignores SIGTERM unless it handles it: the kubelet would wait out the grace period, then kill
    before = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        args = build_parser().parse_args(argv)
        if args.command == "smoke":
            return smoke(args)
        try:
            # what was not given is left to JobOptions, which takes it from the environment or settings
            # (a template that rendered empty, such as --model "" from an unset param, counts as not given)
            fields = {k: v for k, v in vars(args).items() if k in JobOptions.model_fields and v is not None and v != "" and v is not False}
            opts = JobOptions(**{**fields, "params": dict(args.params)})
        except ValidationError as err:
            raise ConfigError(f"bad options: {describe_validation_error(err)}") from None
        manifest = run_job(opts, stop_on=STOP_SIGNALS)
    except JobError as err:
        if isinstance(err, UnexpectedError):
            log.error("the run failed unexpectedly", exc_info=err.__cause__)
        print(f"vqa_operators: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    write_xcom(args.xcom_file or settings.environment().xcom_file, manifest.dump())
    print(json.dumps(manifest.dump(), sort_keys=True), flush=True)
    return 0
