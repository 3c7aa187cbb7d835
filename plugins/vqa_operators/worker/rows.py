"""The row scheduler: rows through a generator with bounded concurrency, outcomes yielded in input order.

``run_rows`` keeps at most ``concurrency`` rows running, lets rows that finished ahead of a slower
one wait (a bounded reorder), and stops everything on a job-level error; ``RowOutcome`` is what one
input line came to. Plain asyncio: the run loop (``run_loop.process``) and the seeds' operators
both drive it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vqa_operators.exceptions import RowError
from vqa_operators.generators.base import Generated, Generator, input_line
from vqa_operators.records import ErrorEntry, Finished
from vqa_operators.storage.jsonl import BadLine

RAW_OUTPUT_LIMIT = 2000


@dataclass
class RowOutcome:
    """One input line's result: the fields to add, or the error that sends it to the errors file."""

    line: int
    row: dict[str, Any] | None
    error: RowError | BadLine | None = None
    # the row's final record (kept, rejected or failed), once the worker has made it ...
    record: Finished | None = None
    # ... or when an earlier try had already made it
    reused: bool = False
    # what the stage made of the row (None: a bad line, a row error, or a row reused from an earlier try)
    made: Generated | None = None

    @property
    def fields(self) -> dict[str, Any] | None:
        """The fields the stage adds to the row (None if it made nothing)."""
        return self.made.fields if self.made is not None else None

    def error_entry(self, stage: str) -> ErrorEntry:
        """The errors-file record: the input (row or raw line) with a reason."""
        err = self.error
        assert err is not None
        line = input_line(self.row, self.line)
        if isinstance(err, BadLine):
            return ErrorEntry(stage=stage, line=line, reason=err.reason, detail=err.detail, raw_line=err.raw)
        raw = err.raw_output[:RAW_OUTPUT_LIMIT] if err.raw_output is not None else None
        return ErrorEntry(stage=stage, line=line, reason=err.reason, detail=err.detail, row=self.row, raw_output=raw)


async def run_rows(
    generator: Generator,
    items: Iterable[tuple[int, dict[str, Any] | BadLine | RowOutcome]],
    *,
    concurrency: int,
    on_finished: Callable[[RowOutcome], None] | None = None,
    reorder: int | None = None,
) -> AsyncIterator[RowOutcome]:
    """Process rows with at most ``concurrency`` running at once, yielding outcomes in input order.

    Rows that finish ahead of a slower one wait, finished, for it to be yielded: up to ``reorder``
    of them (default ``4 * concurrency``), so that one slow row (a long answer, a repair) does not stop
    new rows from starting while the server has room. ``on_finished`` sees each new outcome as
    soon as its row finishes, in completion order, so that rows finished behind a slow one are not
    lost if the job fails. An item that is already a RowOutcome (a row finished by an earlier try)
    is passed through. Any other exception than RowError, from any row running, propagates at once
    and cancels the rest: the job fails as a whole (a down server is not a reason to fail rows).
    """
    loop = asyncio.get_running_loop()
    fatal: asyncio.Future[None] = loop.create_future()
    reorder = 4 * concurrency if reorder is None else reorder
    running: set[asyncio.Task[RowOutcome]] = set()

    async def one(line: int, item: dict[str, Any] | BadLine | RowOutcome) -> RowOutcome:
        if isinstance(item, RowOutcome):
            return item
        try:
            if isinstance(item, BadLine):
                outcome = RowOutcome(line=line, row=None, error=item)
            else:
                try:
                    outcome = RowOutcome(line=line, row=item, made=await generator.run_row(item))
                except RowError as err:
                    outcome = RowOutcome(line=line, row=item, error=err)
            if on_finished is not None:
                on_finished(outcome)
        except BaseException as exc:
            if not fatal.done() and not isinstance(exc, asyncio.CancelledError):
                fatal.set_exception(exc)
            raise
        return outcome

    def start(line: int, item: dict[str, Any] | BadLine | RowOutcome) -> None:
        task = asyncio.ensure_future(one(line, item))
        running.add(task)
        task.add_done_callback(running.discard)
        pending.append(task)

    async def wait_for(tasks: set[asyncio.Task[RowOutcome]]) -> None:
        waited: set[asyncio.Future[Any]] = {*tasks, fatal}
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if fatal.done():
            fatal.result()  # raises the first job-level error; the finally below cancels the rest

    pending: deque[asyncio.Task[RowOutcome]] = deque()  # in input order: running, then finished and waiting
    try:
        for line, item in items:
            start(line, item)
            while True:
                while pending and pending[0].done():
                    yield pending.popleft().result()
                if len(running) < concurrency and len(pending) - len(running) < reorder:
                    break
                # a running row must finish: the head (to make room to reorder) or any (to make room to run)
                await wait_for({pending[0]} if len(running) < concurrency else set(running))
        while pending:
            await wait_for({pending[0]})
            yield pending.popleft().result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
