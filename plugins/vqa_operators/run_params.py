"""A run's params are data: the run's dates are the one substitution, and every location lies within the allowed roots.

A user who may trigger a DAG is not trusted with the worker's files or the deployment's
connections and variables. So no param is rendered as a template: the only placeholders a param
may hold are the run's dates in ``input_uri`` (``{{ ds }}`` and the like), which ``fill_run_dates``
replaces knowing the run's logical date and nothing else. Anything else that looks like a template
is refused. The locations a run reads and writes must lie within the roots the deployment allows
(``VQA_ALLOWED_INPUT_ROOTS``, ``VQA_ALLOWED_OUTPUT_ROOTS``, ``VQA_ALLOWED_MEDIA_ROOTS``); with none
configured, only ``s3://`` is allowed. Messages name the param and the rule, never a rendered value.
Plain Python: the plan task calls it before a byte is read or written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from vqa_operators.exceptions import ConfigError
from vqa_operators.storage.uris import dot_segments, is_s3, within

# Airflow's names for the run's dates, formatted as Airflow's task context formats them
RUN_DATES: dict[str, str] = {
    "ds": "%Y-%m-%d",
    "ds_nodash": "%Y%m%d",
    "ts_nodash": "%Y%m%dT%H%M%S",
}
ISO_DATES = ("ts", "ts_nodash_with_tz")
PLACEHOLDERS = "{{ ds }}, {{ ds_nodash }}, {{ ts }}, {{ ts_nodash }}, {{ ts_nodash_with_tz }} and {{ macros.ds_add(ds, N) }}"
_EXPRESSION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_DS_ADD = re.compile(r"macros\.ds_add\(\s*ds\s*,\s*([+-]?\d{1,5})\s*\)")
# what Jinja would read as a tag, an expression or a comment
_TEMPLATE = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")

# the settings that allow each kind of location
INPUT_ROOTS = "VQA_ALLOWED_INPUT_ROOTS"
OUTPUT_ROOTS = "VQA_ALLOWED_OUTPUT_ROOTS"
MEDIA_ROOTS = "VQA_ALLOWED_MEDIA_ROOTS"


def looks_like_template(text: str) -> bool:
    """True if Jinja would find a tag, an expression or a comment in ``text``."""
    return bool(_TEMPLATE.search(text))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple | set):
        for item in value:
            yield from _strings(item)


def refuse_templates(params: Mapping[str, Any], *, dated: Collection[str] = ()) -> None:
    """ConfigError for the first param that holds a template; those in ``dated`` may hold the run's date placeholders."""
    for name, value in params.items():
        for text in _strings(value):
            if name in dated:
                fill_run_dates(text, None, param=name, check_only=True)
            elif looks_like_template(text):
                raise ConfigError(
                    f"param {name} holds a template ({{{{ }}}}, {{% %}} or {{# #}}): params are data, and only input_uri may hold the run's dates"
                )


def fill_run_dates(text: str, logical_date: datetime | None, *, param: str = "input_uri", check_only: bool = False) -> str:
    """``text`` with the run's date placeholders replaced; any other template is a ConfigError, and so is a date without a logical date.

    The placeholders are Airflow's own names: ``{{ ds }}`` (2026-01-05), ``{{ ds_nodash }}``,
    ``{{ ts }}`` (ISO 8601), ``{{ ts_nodash }}``, ``{{ ts_nodash_with_tz }}``, and
    ``{{ macros.ds_add(ds, N) }}`` (``ds`` N days later, N may be negative).
    ``check_only``: check the placeholders, fill nothing (no logical date needed).
    """

    def replace(match: re.Match[str]) -> str:
        expression = match.group(1).strip()
        days = _DS_ADD.fullmatch(expression)
        if expression not in RUN_DATES and expression not in ISO_DATES and days is None:
            raise ConfigError(
                f"param {param} holds a template that is not one of the run's dates: params are data; the only placeholders are {PLACEHOLDERS}"
            )
        if check_only:
            return ""
        if logical_date is None:
            raise ConfigError(
                f"param {param} uses the run's date, and this run has no logical date (a run triggered without one has no ds): "
                "give it a concrete path, or trigger the run with a logical date"
            )
        if days is not None:
            return (logical_date + timedelta(days=int(days.group(1)))).strftime(RUN_DATES["ds"])
        if expression in RUN_DATES:
            return logical_date.strftime(RUN_DATES[expression])
        iso = logical_date.isoformat()
        return iso if expression == "ts" else iso.replace("-", "").replace(":", "")

    filled = _EXPRESSION.sub(replace, text)
    if looks_like_template(filled):
        raise ConfigError(
            f"param {param} holds a template that is not one of the run's dates: params are data; the only placeholders are {PLACEHOLDERS}"
        )
    return text if check_only else filled


def check_location(param: str, uri: str, roots: list[str], *, setting: str) -> None:
    """ConfigError unless ``uri`` is an ``s3://`` URI or an absolute path within ``roots``; with no roots, ``s3://`` only.

    Local paths are resolved, symlinks included, before they are compared; a ``.`` or ``..``
    segment is refused outright, local or S3.
    """
    if not (is_s3(uri) or os.path.isabs(uri)):
        raise ConfigError(f"param {param} must be an s3:// URI or an absolute path")
    if dot_segments(uri):
        raise ConfigError(f"param {param} has a '.' or '..' segment: a location is named without traversal")
    if not roots:
        if not is_s3(uri):
            raise ConfigError(
                f"param {param} is a local path, and {setting} is not set: with no allowed roots configured, only s3:// locations are allowed"
            )
        return
    if not any(within(uri, root) for root in roots):
        raise ConfigError(
            f"param {param} lies outside the allowed roots ({setting}: {', '.join(roots)}); local paths are compared after resolving symlinks"
        )


def check_model_name(param: str, name: str) -> None:
    """ConfigError if a triggered model names a local path: a worker that loads the model itself would read that folder."""
    if name.startswith(("/", ".", "~")) or "\\" in name or "://" in name or dot_segments(name):
        raise ConfigError(f"param {param} must name a model (a served name or a Hub id such as Org/Model), not a path or URL")
