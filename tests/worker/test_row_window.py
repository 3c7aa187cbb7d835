"""The worker's row window (``run_rows``): bounded, ordered, and not held up by one slow row."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vqa_operators.generators.base import Generated
from vqa_operators.worker.rows import run_rows


class Scripted:
    """A stand-in generator: row 0 waits until ``release_after`` other rows have finished; it records how many run at once."""

    def __init__(self, release_after: int) -> None:
        self.release_after = release_after
        self.finished = 0
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()

    async def run_row(self, row: dict[str, Any]) -> Generated:
        fields, meta = await self.generate(row)
        return Generated(fields, meta)

    async def generate(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if row["id"] == 0:
                await self.release.wait()
            else:
                await asyncio.sleep(0.001)
                self.finished += 1
                if self.finished >= self.release_after:
                    self.release.set()
            return {"done": row["id"]}, {}
        finally:
            self.running -= 1


def run(generator: Scripted, rows: int, concurrency: int, reorder: int | None = None, timeout: float = 10) -> list[int]:
    async def go() -> list[int]:
        items = [(i + 1, {"id": i}) for i in range(rows)]
        return [o.row["id"] async for o in run_rows(generator, items, concurrency=concurrency, reorder=reorder)]  # type: ignore[arg-type]

    return asyncio.run(asyncio.wait_for(go(), timeout=timeout))


def test_one_slow_row_does_not_stop_new_rows_from_starting() -> None:
    # row 0 finishes only after 12 others have. A window that counted finished rows waiting for it
    # would let only 3 others run; this one keeps 4 running behind it, and holds up to 16 finished
    generator = Scripted(release_after=12)
    assert run(generator, rows=60, concurrency=4) == list(range(60))  # still in input order
    assert generator.most_running == 4


def test_the_rows_waiting_for_a_slow_one_are_bounded() -> None:
    # with room to hold only 10 finished rows, row 0 (released by the 30th) never finishes: no row starts past the bound
    generator = Scripted(release_after=30)
    with pytest.raises(TimeoutError):
        run(generator, rows=60, concurrency=4, reorder=10, timeout=1)
    assert 10 <= generator.finished <= 10 + 3  # the reorder room, and the rows that were running when it filled
