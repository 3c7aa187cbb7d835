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
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError, Interrupted, JobError, UnexpectedError
from vqa_operators.generators import GENERATORS
from vqa_operators.worker.options import JobOptions, cli_kind, flag_of, form_of, job_options
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


def help_of(name: str, info: FieldInfo) -> str:
    """A flag's help: the field's description, its default, and its variable where it has one."""
    default = info.get_default(call_default_factory=True)
    parts = [info.description or name.replace("_", " ")]
    if default not in (None, False, [], {}, ""):
        parts.append(f"(default {default:g})" if isinstance(default, float) else f"(default {default})")
    if settings.is_worker_setting(info):
        parts.append(f"[{settings.PREFIX}{name.upper()}{', comma-separated' if form_of(info) == 'list' else ''}]")
    return " ".join(parts)


def add_options(parser: argparse.ArgumentParser, model: type[JobOptions] = JobOptions) -> None:
    """A flag per field of ``model`` (``JobOptions``): its name, help, choices, and whether it repeats, all from the field.

    Values stay text here; ``JobOptions`` converts each once, by its field's type. A flag left out is not given.
    """
    for name, info in model.model_fields.items():
        kind = cli_kind(info)
        if kind == "positional":
            parser.add_argument(name, choices=sorted(GENERATORS) if name == "generator" else None, help=info.description)
            continue
        if kind is not True:
            continue
        flag, text, form = flag_of(name, info), help_of(name, info), form_of(info)
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
        if form == "switch":
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
        elif form in ("list", "mapping"):
            mapping = form == "mapping"
            parser.add_argument(
                flag,
                dest=name,
                action="append",
                type=_param if mapping else str,
                metavar="KEY=VALUE" if mapping else None,
                help=text,
            )
        else:
            parser.add_argument(flag, dest=name, choices=choices, required=info.is_required(), help=text)


def build_parser(model: type[JobOptions] = JobOptions) -> argparse.ArgumentParser:
    """The CLI: ``run <generator>`` with a flag per ``JobOptions`` field (``model``), and ``smoke``."""
    parser = argparse.ArgumentParser(prog="python -m vqa_operators", description="Run one generator over a JSONL file.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one generator over a JSONL file")
    add_options(run, model)
    run.add_argument("--xcom-file", help="also write the manifest here (KubernetesPodOperator XCom) [VQA_XCOM_FILE]")
    smoke = sub.add_parser(
        "smoke",
        help="check what a worker needs of this pod (vqa_smoke): user, read-only root, data root, model server, cache, GPU",
    )
    smoke.add_argument("--data-root", required=True, help="folder or s3:// prefix to write a probe object under (<root>/smoke/)")
    smoke.add_argument("--name", default="pod", help="this pod's role, in the probe object's name")
    smoke.add_argument("--uid", type=int, required=True, help="the user the pod must run as")
    smoke.add_argument("--model-cache", help="the model cache's folder, which must be writable")
    smoke.add_argument("--gpus", type=int, default=0, help="GPUs requested: each must be a device in /dev")
    smoke.add_argument(
        "--expect-gpu", action="store_true", help="a missing GPU fails the check (else it is reported, not required)"
    )
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
        storage=Storage(),
        root=args.data_root,
        name=args.name,
        expected_uid=args.uid,
        base_url=env.base_url,
        model=env.model,
        api_key=settings.variable(settings.API_KEY_ENV),
        model_cache=args.model_cache,
        gpus=args.gpus,
        expect_gpu=args.expect_gpu,
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
        # what was not given is left to JobOptions, which takes it from the environment or settings
        # (an empty value, such as --model "", counts as not given)
        given = {name: value for name, value in vars(args).items() if name in JobOptions.model_fields}
        opts = job_options({**given, "params": dict(given.get("params") or [])})
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
