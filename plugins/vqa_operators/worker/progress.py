"""A try's counts, and the progress line the worker logs after each batch of rows."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from vqa_operators.exceptions import TryProgress
from vqa_operators.generators.quality import pair_verdicts
from vqa_operators.records import Finished, PairVerdict, QualityScores, WouldReject


class Progress:
    """Counts of one try, and the progress line logged after each batch of rows."""

    def __init__(self, name: str, total: int | None, batch: int) -> None:
        self.name = name
        self.total = total
        self.batch = max(1, batch)
        self.started = time.monotonic()
        self.done = self.reused = self.out = 0
        # rows this try finished and checkpointed, in any order (a row may finish before one ahead of it)
        self.finished = 0
        self.reasons: Counter[str] = Counter()
        # a quality gate's counts: rows with no pair left, pairs kept, pairs rejected by reason
        self.rows_rejected = self.pairs_kept = 0
        # QA pairs in the rows written out (a gate's kept pairs)
        self.pairs_out = 0
        # a gate's verdicts: their distribution
        self.scores: QualityScores | None = None
        self.rejections: Counter[str] = Counter()
        self.judges = False

    @property
    def failed(self) -> int:
        """Rows sent to the errors file so far."""
        return sum(self.reasons.values())

    def add(self, record: Finished, reused: bool) -> None:
        """Count one finished row (in input order)."""
        self.done += 1
        self.reused += reused
        if record.error is not None:
            self.reasons[str(record.error.reason)] += 1  # a Reason, or its value read back from a checkpoint
        elif record.out is not None:
            self.out += 1
        else:
            self.rows_rejected += 1
        if record.pairs_kept is not None:
            self.judges = True
            self.pairs_kept += record.pairs_kept
            # a rejected pair's verdicts with the rejection filter made, as annotate writes a kept pair's
            dropped = [
                (e.verdicts or PairVerdict()).model_copy(update={"rejection": WouldReject(reason=str(e.reason))})
                for e in record.rejected
            ]
            self.scores = (self.scores or QualityScores()).add([*pair_verdicts(record.out, self.name), *dropped])
        for entry in record.rejected:
            self.rejections[str(entry.reason)] += 1

    @property
    def pairs_rejected(self) -> int:
        """Pairs a quality decision dropped so far."""
        return sum(self.rejections.values())

    def acceptance(self) -> str:
        """``"kept 40 of 60 pairs (66.7%), rejected {...}, 3 rows rejected"`` for a gate; empty otherwise."""
        if not self.judges:
            return ""
        judged = self.pairs_kept + self.pairs_rejected
        rate = f" ({100 * self.pairs_kept / judged:.1f}%)" if judged else ""
        return f", kept {self.pairs_kept} of {judged} pairs{rate}, rejected {dict(sorted(self.rejections.items()))}, {self.rows_rejected} rows rejected"

    def due(self) -> bool:
        """Whether a batch has just completed (or the last row)."""
        return self.done % self.batch == 0 or self.done == self.total

    def line(self, usage: Any) -> str:
        """``image_qa: 640/10000 rows (6.4%), 12.3 rows/s, 1,234,567 tokens (in 1,100,000, out 134,567), ETA 12m40s, 3 failed {...}, 128 reused``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        fresh = self.done - self.reused
        rate = fresh / elapsed
        of = f"/{self.total} rows ({100 * self.done / self.total:.1f}%)" if self.total else " rows"
        if not self.total:
            eta = "ETA unknown"
        elif self.done >= self.total:
            eta = "ETA 0s"
        elif rate > 0:
            eta = f"ETA {_duration((self.total - self.done) / rate)}"
        else:
            eta = "ETA unknown"
        tokens = usage.prompt_tokens + usage.completion_tokens
        failures = f"{self.failed} failed" + (f" {dict(sorted(self.reasons.items()))}" if self.reasons else "")
        return (
            f"{self.name}: {self.done}{of}, {rate:.1f} rows/s, {tokens:,} tokens (in {usage.prompt_tokens:,}, out {usage.completion_tokens:,}), "
            f"{eta}, {failures}{self.acceptance()}, {self.reused} reused"
        )

    def snapshot(self) -> TryProgress:
        """What a failed try had done: the job error carries it to the failure callback."""
        return TryProgress(
            rows_total=self.total,
            rows_done=self.done,
            rows_finished=self.finished,
            rows_reused=self.reused,
            rows_failed=self.failed,
            failures_by_reason=dict(sorted(self.reasons.items())),
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_batch(total: int | None, concurrency: int) -> int:
    """Rows per progress line: as many rows as requests run at once, or a twentieth of the shard if that is smaller."""
    return min(concurrency, -(-total // 20)) if total else concurrency
