"""Generators: plain Python that turns rows into QA fields, plus the seeds' operator classes."""

from __future__ import annotations

from importlib import import_module

from vqa_operators.generators.base import Generator

# name -> "module:Class"; imported only when chosen
GENERATORS: dict[str, str] = {
    "image_qa": "vqa_operators.generators.image_qa:ImageQAGenerator",
    "pers_qa": "vqa_operators.generators.pers_qa:PersQAGenerator",
    "video_qa_initial": "vqa_operators.generators.video_qa:VideoQAInitialGenerator",
    "video_qa_multiagent": "vqa_operators.generators.video_qa:VideoQAMultiAgentGenerator",
    "video_qa_final": "vqa_operators.generators.video_qa:VideoQAFinalGenerator",
}


def generator_class(name: str) -> type[Generator]:
    """The generator class registered under ``name``."""
    from vqa_operators.exceptions import ConfigError

    try:
        module, _, attr = GENERATORS[name].partition(":")
    except KeyError:
        raise ConfigError(f"unknown generator {name!r}; choose one of {sorted(GENERATORS)}") from None
    return getattr(import_module(module), attr)
