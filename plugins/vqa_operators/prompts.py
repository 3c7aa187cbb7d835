"""Prompt templates: Jinja2 files under ``include/prompts/<name>/`` plus ``include/prompts/common/``.

Every output record carries the SHA-256 of the template sources that produced it, so a change
of wording is visible in the data and (later) invalidates cached work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import jinja2

from vqa_operators import settings
from vqa_operators.exceptions import ConfigError


def prompts_dir() -> Path:
    """Return the prompt folder: ``VQA_PROMPTS_DIR``, else the package's (or the repository's) ``include/prompts``."""
    return Path(settings.environment().prompts_dir or settings.include_dir() / "prompts")


@dataclass(frozen=True)
class PromptSet:
    """The templates of one generator, rendered with strict undefined variables."""

    name: str
    sha256: str
    _templates: dict[str, jinja2.Template] = field(repr=False)

    def render(self, template: str, **variables: object) -> str:
        """Render ``<template>.j2`` with ``variables``; a missing variable is an error."""
        try:
            tpl = self._templates[template]
        except KeyError:
            raise ConfigError(f"prompt set {self.name!r} has no template {template!r}") from None
        return tpl.render(**variables).strip()


@cache
def load_prompts(name: str, root: str | None = None) -> PromptSet:
    """Load every ``*.j2`` of ``<root>/<name>/`` and ``<root>/common/`` and hash their sources."""
    base = Path(root) if root else prompts_dir()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)  # noqa: S701 - prompts are text for a model, never HTML
    templates: dict[str, jinja2.Template] = {}
    digest = hashlib.sha256()
    files = sorted((base / "common").glob("*.j2")) + sorted((base / name).glob("*.j2"))
    if not any(f.parent.name == name for f in files):
        raise ConfigError(f"no prompt templates found for {name!r} under {base}")
    for path in files:
        source = path.read_text(encoding="utf-8")
        rel = f"{path.parent.name}/{path.name}"
        digest.update(rel.encode() + b"\0" + source.encode() + b"\0")
        templates[path.stem] = env.from_string(source)
    return PromptSet(name=name, sha256=digest.hexdigest(), _templates=templates)
