"""A trigger's params are data: the run's dates are the one substitution, and no location leaves the allowed roots."""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
import pytest

from vqa_operators.exceptions import ConfigError
from vqa_operators.run_params import check_location, check_model_name, fill_run_dates, refuse_templates
from vqa_operators.storage.uris import within

DAY = pendulum.datetime(2026, 1, 5, 6, 30, tz="UTC")


@pytest.mark.parametrize(
    ("text", "filled"),
    [
        ("s3://b/raw/{{ ds }}/in.jsonl", "s3://b/raw/2026-01-05/in.jsonl"),
        ("s3://b/raw/{{ds_nodash}}/in.jsonl", "s3://b/raw/20260105/in.jsonl"),
        ("/data/{{ ts_nodash }}.jsonl", "/data/20260105T063000.jsonl"),
        ("s3://b/{{ ts }}.jsonl", "s3://b/2026-01-05T06:30:00+00:00.jsonl"),
        ("s3://b/{{ ts_nodash_with_tz }}.jsonl", "s3://b/20260105T063000+0000.jsonl"),
        ("s3://b/{{ macros.ds_add(ds, -1) }}/{{ macros.ds_add(ds,7) }}", "s3://b/2026-01-04/2026-01-12"),
        ("s3://b/plain.jsonl", "s3://b/plain.jsonl"),
    ],
)
def test_the_run_dates_are_filled_as_airflow_formats_them(text: str, filled: str) -> None:
    assert fill_run_dates(text, DAY) == filled


@pytest.mark.parametrize(
    "text",
    [
        "s3://b/{{ conn.vqa_vlm.password }}.jsonl",
        "s3://b/{{ var.value.secret }}.jsonl",
        "s3://b/{{ ds }}{{ dag_run.conf }}.jsonl",
        "s3://b/{{ ds | upper }}.jsonl",
        "s3://b/{{ macros.ds_add(ds, conn.x) }}.jsonl",
        "s3://b/{% for x in range(3) %}a{% endfor %}.jsonl",
        "s3://b/{# a comment #}.jsonl",
        "s3://b/{{ ds }.jsonl",
        "s3://b/}}{{.jsonl",
    ],
)
def test_anything_else_that_looks_like_a_template_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(ConfigError, match="param input_uri holds a template") as err:
        fill_run_dates(text, DAY)
    assert "conn" not in str(err.value) and "var." not in str(err.value) and "{% for" not in str(err.value)
    with pytest.raises(ConfigError, match="param input_uri holds a template"):
        refuse_templates({"input_uri": text}, dated=("input_uri",))


def test_a_date_without_a_logical_date_is_a_clear_error_and_a_plain_uri_needs_none() -> None:
    with pytest.raises(ConfigError, match="this run has no logical date"):
        fill_run_dates("s3://b/{{ ds }}/in.jsonl", None)
    assert fill_run_dates("s3://b/x.jsonl", None) == "s3://b/x.jsonl"


def test_every_other_param_is_data_whatever_its_type() -> None:
    ok = {
        "input_uri": "s3://b/{{ ds }}/x.jsonl",
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "export_formats": ["parquet"],
        "seed": 3,
        "tag": "<mam>",
    }
    refuse_templates(ok, dated=("input_uri",))
    for name, value in [
        ("model", "{{ conn.vqa_vlm.password }}"),
        ("output_prefix", "s3://b/{{ ds }}"),
        ("export_formats", ["parquet", "{{ var.value.x }}"]),
        ("tag", "{%raw%}"),
        ("media_root", {"nested": "{# x #}"}),
    ]:
        with pytest.raises(ConfigError, match=rf"param {name} holds a template .*: params are data"):
            refuse_templates({**ok, name: value}, dated=("input_uri",))


def test_locations_lie_within_the_roots_symlinks_resolved(tmp_path: Path) -> None:
    root, outside = tmp_path / "allowed", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.jsonl").write_text("private\n")
    os.symlink(outside / "secret.jsonl", root / "link.jsonl")
    os.symlink(outside, root / "dir-link")
    roots = [str(root), "s3://media-bucket/team-a"]
    check_location("input_uri", str(root / "in.jsonl"), roots, setting="VQA_ALLOWED_INPUT_ROOTS")
    check_location("input_uri", "s3://media-bucket/team-a/x/in.jsonl", roots, setting="VQA_ALLOWED_INPUT_ROOTS")
    check_location("media_root", "s3://media-bucket/team-a", roots, setting="VQA_ALLOWED_MEDIA_ROOTS")  # the root itself
    check_location("media_root", "s3://media-bucket/team-a/", roots, setting="VQA_ALLOWED_MEDIA_ROOTS")
    refused = {
        str(outside / "secret.jsonl"): "lies outside the allowed roots",
        str(root / "link.jsonl"): "lies outside the allowed roots",  # a symlink to a file outside
        str(root / "dir-link" / "secret.jsonl"): "lies outside the allowed roots",  # through a symlinked folder
        f"{root}/../private/secret.jsonl": "'..' segment",
        f"{root}/./in.jsonl": "'..' segment",
        "s3://media-bucket/team-a/../team-b/in.jsonl": "'..' segment",
        "s3://media-bucket/team-ab/in.jsonl": "lies outside the allowed roots",  # a sibling prefix, not a sub-folder
        "s3://other-bucket/team-a/in.jsonl": "lies outside the allowed roots",
        "relative/in.jsonl": "must be an s3:// URI or an absolute path",
    }
    for uri, message in refused.items():
        with pytest.raises(ConfigError, match=message) as err:
            check_location("input_uri", uri, roots, setting="VQA_ALLOWED_INPUT_ROOTS")
        assert "param input_uri" in str(err.value) and "private" not in str(err.value).replace(str(tmp_path), "")


def test_with_no_roots_configured_only_s3_is_allowed(tmp_path: Path) -> None:
    check_location("output_prefix", "s3://any-bucket/out", [], setting="VQA_ALLOWED_OUTPUT_ROOTS")
    with pytest.raises(
        ConfigError,
        match=r"param output_prefix is a local path, and VQA_ALLOWED_OUTPUT_ROOTS is not set: .* only s3:// locations",
    ):
        check_location("output_prefix", str(tmp_path), [], setting="VQA_ALLOWED_OUTPUT_ROOTS")


def test_within_compares_whole_segments() -> None:
    assert within("s3://b/a/x", "s3://b/a") and within("s3://b/a", "s3://b/a/") and within("s3://b/x", "s3://b")
    assert not within("s3://b/ab/x", "s3://b/a") and not within("s3://bb/a/x", "s3://b") and not within("/data/x", "s3://b")
    assert within("/data/a/x", "/data/a") and not within("/data/ab", "/data/a")


@pytest.mark.parametrize(
    "name", ["/etc", "./models", "../models", "~/models", "models/../../etc", "file:///etc", "C:\\models", "s3://b/model"]
)
def test_a_triggered_model_is_a_name_not_a_path(name: str) -> None:
    with pytest.raises(ConfigError, match="param model must name a model"):
        check_model_name("model", name)


@pytest.mark.parametrize(
    "name", ["Qwen/Qwen2.5-VL-7B-Instruct", "HuggingFaceTB/SmolVLM-256M-Instruct", "llava:7b", "served-model"]
)
def test_model_names_pass(name: str) -> None:
    check_model_name("model", name)


def test_the_roots_settings_refuse_relative_and_traversing_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators import settings

    monkeypatch.setenv("VQA_ALLOWED_INPUT_ROOTS", "s3://in-bucket/raw, /data/in")
    monkeypatch.setenv("VQA_ALLOWED_OUTPUT_ROOTS", "s3://out-bucket")
    env = settings.environment()
    assert (env.allowed_input_roots, env.allowed_output_roots, env.preview_link_seconds) == (
        ["s3://in-bucket/raw", "/data/in"],
        ["s3://out-bucket"],
        86400,
    )
    for value in ("data/in", "/data/../etc", "s3://", "ftp://x"):
        monkeypatch.setenv("VQA_ALLOWED_INPUT_ROOTS", value)
        with pytest.raises(ConfigError, match="VQA_ALLOWED_INPUT_ROOTS must be a comma-separated list of absolute folders"):
            settings.environment()
    monkeypatch.delenv("VQA_ALLOWED_INPUT_ROOTS")
    monkeypatch.setenv("VQA_PREVIEW_LINK_SECONDS", str(8 * 24 * 3600))  # past SigV4's 7 days
    with pytest.raises(ConfigError, match="VQA_PREVIEW_LINK_SECONDS must be less than or equal to 604800"):
        settings.environment()


def test_the_worker_confines_its_input_and_output_when_roots_are_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqa_operators.worker import JobOptions, check_options

    monkeypatch.setenv("VQA_ALLOWED_INPUT_ROOTS", "s3://in-bucket/raw")
    monkeypatch.setenv("VQA_ALLOWED_OUTPUT_ROOTS", "s3://out-bucket/runs")
    base = {"generator": "image_qa", "media_root": "s3://in-bucket/", "staging_root": "s3://out-bucket/runs/image_qa/r1"}
    check_options(
        JobOptions(**base, input="s3://in-bucket/raw/a.jsonl", output="s3://out-bucket/runs/image_qa/r1/generate.jsonl")
    )
    # a later stage reads what an earlier one staged in the run's folder
    check_options(
        JobOptions(
            **base, input="s3://out-bucket/runs/image_qa/r1/ingest.jsonl", output="s3://out-bucket/runs/image_qa/r1/initial.jsonl"
        )
    )
    with pytest.raises(ConfigError, match=r"--input is outside the allowed input roots \(VQA_ALLOWED_INPUT_ROOTS\)"):
        check_options(
            JobOptions(**base, input="s3://elsewhere/a.jsonl", output="s3://out-bucket/runs/image_qa/r1/generate.jsonl")
        )
    with pytest.raises(ConfigError, match=r"--output is outside the allowed output roots \(VQA_ALLOWED_OUTPUT_ROOTS\)"):
        check_options(JobOptions(**base, input="s3://in-bucket/raw/a.jsonl", output="/tmp/out/generate.jsonl"))
