"""``JobOptions`` is the one declaration of a worker option: a field added to it alone is a CLI flag, a ``VQA_*`` variable
where marked, a pod argument, and a DAG param with the same name, bounds and description."""

from __future__ import annotations

import pytest
from pydantic import Field

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError
from vqa_operators.operators.dag_config import option_param
from vqa_operators.worker.cli import build_parser
from vqa_operators.worker.options import JobOptions, argv, job_options

BASE = {"generator": "image_qa", "input": "/data/in.jsonl", "output": "/data/out.jsonl"}


class WithANewOption(JobOptions):
    """A copy of the model with one more option, declared as a maintainer would: once."""

    beam_width: int = Field(
        4, ge=1, le=64, title="Beam width", description="Beams the server keeps per request.", json_schema_extra=settings.WORKER
    )
    dry_run_note: str | None = Field(None, description="A note kept in the log.")


def test_a_new_field_is_a_flag_a_variable_a_pod_argument_and_a_param(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CLI: a flag, its help from the field, and its variable named
    parser = build_parser(WithANewOption)
    run = parser._subparsers._group_actions[0].choices["run"]
    action = next(a for a in run._actions if "--beam-width" in a.option_strings)
    assert (
        "Beams the server keeps per request." in action.help
        and "(default 4)" in action.help
        and "[VQA_BEAM_WIDTH]" in action.help
    )
    note = next(a for a in run._actions if "--dry-run-note" in a.option_strings)
    assert "A note kept in the log." in note.help and "VQA_" not in note.help
    args = parser.parse_args(["run", "image_qa", "--output", "/data/out.jsonl", "--input", "/data/in.jsonl", "--beam-width", "8"])
    assert (
        WithANewOption(**{k: v for k, v in vars(args).items() if k in WithANewOption.model_fields and v is not None}).beam_width
        == 8
    )
    # the variable, where the field is marked WORKER; the caller's value wins; a bad variable is named
    monkeypatch.setenv("VQA_BEAM_WIDTH", "16")
    monkeypatch.setenv("VQA_DRY_RUN_NOTE", "not read: the field is not marked")
    assert WithANewOption(**BASE).beam_width == 16 and WithANewOption(**BASE, beam_width=2).beam_width == 2
    assert WithANewOption(**BASE).dry_run_note is None
    monkeypatch.setenv("VQA_BEAM_WIDTH", "99")
    with pytest.raises(ConfigError, match="VQA_BEAM_WIDTH must be less than or equal to 64, got '99'"):
        WithANewOption(**BASE)
    # the pod's arguments
    assert argv({**BASE, "beam_width": 8}, WithANewOption)[-2:] == ["--beam-width", "8"]
    # the trigger-form param: same name, default, bounds, title and description
    param = option_param(WithANewOption, "beam_width")
    assert (param.value, param.schema["type"], param.schema["minimum"], param.schema["maximum"]) == (4, "integer", 1, 64)
    assert (param.schema["title"], param.description) == ("Beam width", "Beams the server keeps per request.")


def test_the_cli_and_the_pod_arguments_round_trip_every_kind_of_option() -> None:
    values = {
        **BASE,
        "concurrency": 12,
        "seed": 3,
        "temperature": 0.5,
        "serve_vllm": True,
        "allowed_media_roots": ["/data", "s3://media"],
        "params": {"pairs_per_row": 2, "tag": "<mam>", "caption": True},
        "shard": {"index": 1, "shards": 2, "input": "/data/in.jsonl", "start": 0, "end": 10, "rows": 3, "first_line": 1},
    }
    parsed = build_parser().parse_args(argv(values))
    given = {k: v for k, v in vars(parsed).items() if k in JobOptions.model_fields}
    opts = job_options({**given, "params": dict(given["params"])})
    assert (opts.concurrency, opts.seed, opts.temperature, opts.serve_vllm) == (12, 3, 0.5, True)
    assert opts.allowed_media_roots == ["/data", "s3://media"] and opts.params == {
        "pairs_per_row": 2,
        "tag": "<mam>",
        "caption": True,
    }
    assert opts.shard is not None and (opts.shard.index, opts.shard.rows) == (1, 3)


def test_a_bad_variable_of_a_shared_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQA_CONCURRENCY", "lots")
    with pytest.raises(ConfigError, match="VQA_CONCURRENCY must be an integer, got 'lots'"):
        JobOptions(**BASE)
    # a field not marked WORKER is never read from the environment
    monkeypatch.delenv("VQA_CONCURRENCY")
    monkeypatch.setenv("VQA_OUTPUT", "/elsewhere/out.jsonl")
    assert JobOptions(**BASE).output == "/data/out.jsonl"
    with pytest.raises(ConfigError, match="output"):
        job_options({"generator": "image_qa", "input": "/data/in.jsonl"})


def test_the_dags_concurrency_param_is_the_options_field() -> None:
    """What the form offers for ``concurrency`` is what the worker accepts: the field's bounds and description, one home."""
    from annotated_types import Ge, Le
    from pydantic import ValidationError

    from vqa_operators.operators.dag_config import io_params

    field = JobOptions.model_fields["concurrency"]
    bounds = {type(m): m for m in field.metadata}
    param = io_params("image_qa", rows_doc="rows", final_task="generate")["concurrency"]
    assert (param.schema["minimum"], param.schema["maximum"]) == (bounds[Ge].ge, bounds[Le].le) == (1, 4096)
    assert param.description == field.description and param.value is None and param.schema["type"] == ["integer", "null"]
    # one value too many is refused by the form's schema and by the options alike
    with pytest.raises(ValueError, match="4097"):
        param.resolve(4097)
    with pytest.raises(ValidationError):
        JobOptions(**BASE, concurrency=4097)
