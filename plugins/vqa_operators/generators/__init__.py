"""Generators: plain Python that turns rows into QA fields, plus the seeds' operator classes."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from vqa_operators.generators.base import PROVENANCE_KEY, Generator, OutputFields

# name -> "module:Class"; imported only when chosen
GENERATORS: dict[str, str] = {
    "image_qa": "vqa_operators.generators.image_qa:ImageQAGenerator",
    "pers_qa": "vqa_operators.generators.pers_qa:PersQAGenerator",
    # video files -> the video stages' input (Meta + Clips with frames, captions and transcripts)
    "video_ingest": "vqa_operators.generators.video_ingest:VideoIngestGenerator",
    "video_qa_initial": "vqa_operators.generators.video_qa:VideoQAInitialGenerator",
    "video_qa_multiagent": "vqa_operators.generators.video_qa:VideoQAMultiAgentGenerator",
    "video_qa_final": "vqa_operators.generators.video_qa:VideoQAFinalGenerator",
    # the quality gate: judges the pairs another generator's rows hold
    "quality": "vqa_operators.generators.quality:QualityGate",
}


def generator_class(name: str) -> type[Generator]:
    """The generator class registered under ``name``."""
    from vqa_operators.exceptions import ConfigError

    try:
        module, _, attr = GENERATORS[name].partition(":")
    except KeyError:
        raise ConfigError(f"unknown generator {name!r}; choose one of {sorted(GENERATORS)}") from None
    return getattr(import_module(module), attr)


def row_output_fields(generator: str, row: dict[str, Any] | None) -> OutputFields:
    """Where ``generator``'s rows keep their QA and media, with the options the run used (read from the row's provenance).

    A quality gate's rows keep its source generator's fields. Options of another version of a
    generator (they no longer parse) fall back to its defaults.
    """
    from vqa_operators.exceptions import ConfigError

    cls = generator_class(generator)
    options = ((row or {}).get(PROVENANCE_KEY) or {}).get(generator, {}).get("options")
    try:
        parsed = cls.parse_options(options if isinstance(options, dict) else None)
    except ConfigError:
        parsed = None
    source = cls.judged_source(parsed) if parsed is not None else None
    if source is not None:
        return row_output_fields(source, row)
    return cls.output_fields(parsed if parsed is not None else cls.parse_options(None))
