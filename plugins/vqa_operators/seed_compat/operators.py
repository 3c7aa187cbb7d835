"""The seeds' operator classes (``ImageQAGenerate`` ...): ``run(storage, ...)`` over a FileStorage step.

They drive the same generators as the worker. Rows that fail are written to the step's errors file
(``..._step<N>.errors.jsonl``) instead of being dropped or stored as fake answers. When stages are
chained through ``df=`` (the video QA example), the returned DataFrame carries the failed rows in
``df.attrs["vqa_errors"]``; the next stage that writes to storage writes them with its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from vqa_operators import settings
from vqa_operators.generators.base import Generator
from vqa_operators.media import MediaReader
from vqa_operators.seed_compat.file_storage import FileStorage, records
from vqa_operators.storage.jsonl import BadLine
from vqa_operators.storage.uris import Storage
from vqa_operators.worker.rows import run_rows

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
T = TypeVar("T")
ERRORS_ATTR = "vqa_errors"


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion, also from code that already has a running loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _process(
    generator: Generator, items: list[tuple[int, dict[str, Any] | BadLine]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    good: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    try:
        async for outcome in run_rows(generator, items, concurrency=2 * generator.serving.concurrency):
            if outcome.error is not None:
                bad.append(outcome.error_entry(generator.name).dump())
            else:
                assert outcome.row is not None and outcome.fields is not None
                good.append(generator.finish_row(outcome.row, outcome.fields))
    finally:
        await generator.serving.aclose()
    return good, bad


def run_step(generator: Generator, storage: FileStorage | None = None, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Read rows (from ``df`` or the storage step), generate, write results and errors to storage, return the results.

    Errors of earlier stages carried in ``df.attrs["vqa_errors"]`` are written (and passed on) too.
    """
    import pandas as pd

    carried: list[dict[str, Any]] = []
    if df is not None:
        items: list[tuple[int, dict[str, Any] | BadLine]] = list(enumerate(records(df), start=1))
        carried = list(df.attrs.get(ERRORS_ATTR, []))
    elif storage is not None:
        rows = storage.read_rows()
        items = [(b.line, b) for b in storage.bad_lines] + list(enumerate(rows, start=1))
    else:
        raise TypeError("pass storage= or df=")
    good, bad = run_sync(_process(generator, items))
    errors = carried + bad
    if storage is not None:
        storage.write(good)
        storage.write_errors(errors)
    if bad:
        where = storage.errors_path if storage is not None else f'the returned DataFrame\'s attrs["{ERRORS_ATTR}"]'
        log.warning("%s: %d of %d rows failed; see %s", generator.name, len(bad), len(items), where)
    result = pd.DataFrame.from_records(good)
    result.attrs[ERRORS_ATTR] = errors
    return result


class _SeedOperator:
    """Shared constructor of the seed-compatible operator classes.

    Image paths resolve as in DataFlow: absolute ones as they are, relative ones against the current
    directory, anywhere. ``media_root`` (relative paths resolve against it) or ``allowed_media_roots``
    confine them: a path outside goes to errors as ``path_not_allowed``, as in the worker.
    """

    def __init__(
        self,
        llm_serving: Any,
        *,
        seed: int | None = None,
        max_pixels: int = settings.MAX_PIXELS,
        media_root: str | None = None,
        allowed_media_roots: list[str] | None = None,
        **options: Any,
    ) -> None:
        self.serving = llm_serving
        self.seed = seed
        self.max_pixels = max_pixels
        self.media_root = media_root
        self.allowed_media_roots = allowed_media_roots
        self.options = options

    def _generator(self, cls: type[Generator], storage: FileStorage | None, **overrides: Any) -> Generator:
        confined = self.media_root is not None or bool(self.allowed_media_roots)
        media = MediaReader(
            storage.storage if storage else Storage(),
            media_root=self.media_root or ".",
            max_pixels=self.max_pixels,
            allowed_roots=self.allowed_media_roots,
            confined=confined,
        )
        return cls(self.serving, options={**self.options, **overrides}, media=media, seed=self.seed)


class ImageQAGenerate(_SeedOperator):
    """Seed 002: ``ImageQAGenerate(serving).run(storage, multi_modal_key="image", output_key="qa_pairs")``."""

    def run(self, storage: FileStorage, multi_modal_key: str = "image", output_key: str = "qa_pairs") -> pd.DataFrame:
        """Generate QA pairs for every row of the storage step and write the next step."""
        from vqa_operators.generators.image_qa import ImageQAGenerator

        generator = self._generator(ImageQAGenerator, storage, image_key=multi_modal_key, output_key=output_key)
        return run_step(generator, storage)


class PersQAGenerate(_SeedOperator):
    """Seed 003: ``PersQAGenerate(serving).run(storage, multi_modal_key="image", output_key="pers_qa")``."""

    def run(self, storage: FileStorage, multi_modal_key: str = "image", output_key: str = "pers_qa") -> pd.DataFrame:
        """Ask one personalised question per row of the storage step and write the next step."""
        from vqa_operators.generators.pers_qa import PersQAGenerator

        generator = self._generator(PersQAGenerator, storage, image_key=multi_modal_key, output_key=output_key)
        return run_step(generator, storage)


class _MultiroleVideoQAStage(_SeedOperator):
    """Seed 000's stages: ``run(storage=None, df=None, input_meta_key="Meta", input_clips_key="Clips", output_key="QA")``."""

    stage: ClassVar[str]
    # options that make the stage write the seed's format exactly
    seed_format: ClassVar[dict[str, Any]] = {}

    def run(
        self,
        storage: FileStorage | None = None,
        df: pd.DataFrame | None = None,
        input_meta_key: str = "Meta",
        input_clips_key: str = "Clips",
        output_key: str = "QA",
    ) -> pd.DataFrame:
        """Run this stage over ``df`` (or the storage step); write to ``storage`` if given; return the rows."""
        from vqa_operators.generators import generator_class

        generator = self._generator(
            generator_class(self.stage),
            storage,
            meta_key=input_meta_key,
            clips_key=input_clips_key,
            output_key=output_key,
            **self.seed_format,
        )
        return run_step(generator, storage, df)


class MultiroleVideoQAInitialGenerator(_MultiroleVideoQAStage):
    """Seed 000, stage 1: ``Meta`` + ``Clips`` -> the initial QA set."""

    stage = "video_qa_initial"


class MultiroleVideoQAMultiAgentGenerator(_MultiroleVideoQAStage):
    """Seed 000, stage 2: ``MultiroleVideoQAMultiAgentGenerator(serving, max_iterations=3)``; experts refine the set."""

    stage = "video_qa_multiagent"


class MultiroleVideoQAFinalGenerator(_MultiroleVideoQAStage):
    """Seed 000, stage 3: about ten best pairs, labelled, as ``QA``: ``[{"Label", "Question", "Answer"}]``."""

    stage = "video_qa_final"
    # the seed's three keys: the clips a pair is about (the worker's "Clips") are not asked for
    seed_format: ClassVar[dict[str, Any]] = {"name_clips": False}
