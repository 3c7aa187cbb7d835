"""The run loop: rows through a generator with bounded concurrency, progress lines, final records, checkpoints.

``run_rows`` schedules rows; ``process`` turns their outcomes into the output and errors files,
checkpointing each finished row; ``run_job`` sets up the model server, media and generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vqa_operators.exceptions import InputError, Interrupted, JobError, RowError, TryProgress, UnexpectedError
from vqa_operators.generators.base import PROVENANCE_KEY, Generated, Generator, input_line, origin_key, row_key
from vqa_operators.generators.quality import pair_verdicts, score_counts
from vqa_operators.media import MediaReader
from vqa_operators.records import CHECKPOINT_FORMAT, Cost, ErrorEntry, Finished, RejectedEntry, StageManifest
from vqa_operators.serving.base import VLMServing
from vqa_operators.storage.checkpoint import Checkpoint, checkpoint_prefix, fingerprint
from vqa_operators.storage.jsonl import BadLine, JsonlWriter, read_jsonl
from vqa_operators.storage.uris import Storage
from vqa_operators.worker.backends import open_serving
from vqa_operators.worker.options import JobOptions, check_options

log = logging.getLogger("vqa_operators.worker")

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
        # a gate's verdicts: their distribution (quality.score_counts)
        self.scores: dict[str, Any] | None = None
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
            dropped = [{**(e.verdicts or {}), "rejection": {"reason": str(e.reason)}} for e in record.rejected]
            self.scores = score_counts([*pair_verdicts(record.out, self.name), *dropped], self.scores)
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
            rows_total=self.total, rows_done=self.done, rows_finished=self.finished, rows_reused=self.reused,
            rows_failed=self.failed, failures_by_reason=dict(sorted(self.reasons.items())),
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_batch(total: int | None, concurrency: int) -> int:
    """Rows per progress line: as many rows as requests run at once, or a twentieth of the shard if that is smaller."""
    return min(concurrency, -(-total // 20)) if total else concurrency


def _provenance(generator: Generator, prior: Any, key: str, meta: dict[str, Any]) -> dict[str, Any]:
    merged = dict(prior) if isinstance(prior, dict) else {}
    merged[generator.name] = {**generator.provenance(), "row_key": key, **meta}
    return merged


def record_key(line: int, item: dict[str, Any] | BadLine) -> str:
    """A row's stable key within its input: line number and content hash (an edited or moved row is new)."""
    if isinstance(item, BadLine):
        return f"{line}:bad:{hashlib.sha256(item.raw.encode('utf-8', 'replace')).hexdigest()[:20]}"
    return f"{line}:{row_key(item)}"


def _record(generator: Generator, outcome: RowOutcome) -> Finished:
    """The row's final record: kept (the output row), failed (the errors-file entry), or rejected by a gate.

    A gate's record also counts the pairs it kept, and a kept row's record lists the pairs it dropped.
    """
    if outcome.error is not None:
        return Finished(error=outcome.error_entry(generator.name))
    made = outcome.made
    assert outcome.row is not None and made is not None
    line = input_line(outcome.row, outcome.line)
    rejected = [RejectedEntry.of(generator.name, line, r, row=outcome.row, row_rejected=not made.kept) for r in made.rejected]
    row = None
    if made.kept:
        row = generator.finish_row(outcome.row, made.fields)
        row[PROVENANCE_KEY] = _provenance(generator, outcome.row.get(PROVENANCE_KEY), origin_key(outcome.row), {"line": line, **made.meta})
    return Finished(out=row, pairs_kept=made.pairs_kept, rejected=rejected)


def settings_fingerprint(generator: Generator, opts: JobOptions) -> str:
    """What decides each row's result: generator, options, prompts, model, sampling and image budget."""
    return fingerprint(
        {"format": CHECKPOINT_FORMAT, "generator": generator.name, **generator.provenance(), "max_pixels": opts.max_pixels, "media_root": opts.media_root}
    )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignals:
    """While a run's rows go: SIGTERM or SIGINT cancels the run once (no new rows; requests in flight cancelled).

    What the run finished is checkpointed by its own cleanup. Installed on the running event loop,
    so the main thread only; a second signal while stopping is ignored.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignals]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        before = {sig: signal.getsignal(sig) for sig in self.signals}

        def stop(sig: signal.Signals) -> None:
            if self.received is None:
                self.received = sig
                log.warning("%s received: taking no new rows, cancelling the requests in flight, checkpointing finished rows", sig.name)
                task.cancel()

        for sig in self.signals:
            loop.add_signal_handler(sig, stop, sig)
        try:
            yield self
        finally:
            for sig in self.signals:
                loop.remove_signal_handler(sig)
                signal.signal(sig, before[sig])


async def process(generator: Generator, storage: Storage, opts: JobOptions, *, stop_on: tuple[signal.Signals, ...] = ()) -> StageManifest:
    """Run every row of ``opts.input`` and write the output and errors files; return the manifest.

    On any failure (and on a signal in ``stop_on``) the rows this try finished are checkpointed, and
    the JobError raised carries what the try had done (``progress``).
    """
    stop = StopOnSignals(stop_on)
    with stop.installed():
        try:
            return await _process(generator, storage, opts, stop)
        except asyncio.CancelledError:
            # a signal that landed as the run was closing (its rows were all accounted for by then)
            if stop.received is None:
                raise
            raise Interrupted(stop.received, "while closing the run; its rows are checkpointed") from None


async def _process(generator: Generator, storage: Storage, opts: JobOptions, stop: StopOnSignals) -> StageManifest:
    assert opts.input is not None
    run_fingerprint = settings_fingerprint(generator, opts)
    checkpoint = Checkpoint(
        storage, checkpoint_prefix(opts.output, opts.task_key, run_fingerprint), every_rows=opts.checkpoint_every, every_seconds=opts.checkpoint_seconds
    )
    keys: dict[int, str] = {}

    # the shard's byte range, if the input is the file that was split (a later stage reads its own file whole)
    shard = opts.shard if opts.shard and opts.shard.input == opts.input else None
    lines = storage.iter_lines(opts.input, start=shard.start, end=shard.end, version=shard.version) if shard else storage.iter_lines(opts.input)
    # a later stage's input is the upstream shard's output, which may hold fewer rows: its total is unknown
    total = shard.rows if shard else None
    progress = Progress(generator.name, total, progress_batch(total, opts.effective_concurrency))

    def items() -> Any:
        for line, item in read_jsonl(lines, first_line=shard.first_line if shard else 1):
            key = keys[line] = record_key(line, item)
            done = checkpoint.get(key)
            yield line, (item if done is None else RowOutcome(line=line, row=None, record=done, reused=True))

    # where this stage's rows keep their QA pairs (a video ingest's rows hold none: it writes clips)
    output_fields = type(generator).output_fields(generator.options)

    def finished(outcome: RowOutcome) -> None:
        # checkpointed as soon as the row finishes, even if rows before it are still running
        outcome.record = _record(generator, outcome)
        checkpoint.add(keys[outcome.line], outcome.record)
        progress.finished += 1

    try:
        loaded = checkpoint.load()
        if loaded or (opts.try_number or 1) > 1:
            log.info("%s: %s%d rows finished by earlier tries will be reused (checkpoint %s)", generator.name, opts.attempt, loaded, checkpoint.prefix)
        await generator.serving.check()
        with contextlib.ExitStack() as files:
            out = JsonlWriter(files.enter_context(storage.open_atomic(opts.output)))
            err = JsonlWriter(files.enter_context(storage.open_atomic(opts.errors_uri)))
            # only a quality gate drops pairs: its rejected file is written even when it drops none
            rej = JsonlWriter(files.enter_context(storage.open_atomic(opts.rejected_uri))) if generator.gate else None
            try:
                async for outcome in run_rows(generator, items(), concurrency=2 * opts.effective_concurrency, on_finished=finished):
                    del keys[outcome.line]
                    record = outcome.record
                    assert record is not None
                    progress.add(record, outcome.reused)
                    if record.error is not None:
                        err.write(record.error.dump())
                    if record.out is not None:
                        out.write(record.out)
                        progress.pairs_out += record.pairs_kept if record.pairs_kept is not None else len(output_fields.pairs(record.out))
                    if rej is not None:
                        for entry in record.rejected:
                            rej.write(entry.dump())
                    if progress.due():
                        log.info("%s", progress.line(generator.usage))
                if shard is not None and progress.done != shard.rows:
                    raise InputError(f"shard {shard.index} of {opts.input} has {progress.done} rows, not the {shard.rows} planned: the input changed")
            finally:
                # whatever happens, keep the rows this try finished for the next one
                checkpoint.flush()
    except asyncio.CancelledError:
        if stop.received is None:
            raise
        done = progress.snapshot()
        interrupted = Interrupted(stop.received, f"{done.summary()}; checkpointed, so the next try sends only the other rows")
        interrupted.progress = done
        raise interrupted from None
    except JobError as exc:
        # what this try had done, for the failure callback's one-line summary
        exc.progress = progress.snapshot()
        raise
    except Exception as exc:
        unexpected = UnexpectedError(f"{type(exc).__name__}: {exc}")
        unexpected.progress = progress.snapshot()
        raise unexpected from exc
    finally:
        checkpoint.close()
        try:
            await generator.aclose()
        finally:
            await generator.serving.aclose()
    usage = generator.usage
    spent = {"requests": usage.requests, "repairs": usage.repairs, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    return StageManifest(
        generator=generator.name, input=opts.input, shard=opts.shard.index if opts.shard else None, try_number=opts.try_number, output=opts.output,
        errors=opts.errors_uri, rows_in=progress.done, rows_out=progress.out, rows_failed=progress.failed, rows_reused=progress.reused,
        failures_by_reason=dict(sorted(progress.reasons.items())), rejected=opts.rejected_uri if generator.gate else None,
        rows_rejected=progress.rows_rejected, pairs_kept=progress.pairs_kept, pairs_rejected=progress.pairs_rejected,
        rejections_by_reason=dict(sorted(progress.rejections.items())), model=generator.serving.model_name, prompt_sha256=generator.prompts.sha256,
        seed=opts.seed, checkpoint=checkpoint.prefix, **spent, pairs_out=progress.pairs_out, quality_scores=progress.scores,
        # this stage's model calls and tokens per pair it wrote (None: it wrote none)
        cost_per_pair=Cost.per(spent, progress.pairs_out), duration_s=round(time.monotonic() - progress.started, 3),
    )


def run_job(
    opts: JobOptions, *, storage: Storage | None = None, serving: VLMServing | None = None, stop_on: tuple[signal.Signals, ...] = ()
) -> StageManifest:
    """Run one generator over one input file and return the manifest; raise JobError for job-level failures.

    ``stop_on``: signals that stop the run cleanly (the CLI's SIGTERM and SIGINT); the caller must be the main thread.
    """
    storage = storage or Storage()
    # one INFO line per HTTP request would drown the task log; progress lines report instead
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cls = check_options(opts)
    with contextlib.ExitStack() as stack:
        serving = serving or open_serving(opts, stack)
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="vqa-media"))
        media = MediaReader(storage, media_root=opts.media_root, max_pixels=opts.max_pixels, executor=executor, allowed_roots=opts.media_roots)
        generator = cls(serving, options=opts.params, media=media, seed=opts.seed, output=opts.output)
        split = f", the server's budget split between {opts.sharing} shards" if opts.sharing > 1 and opts.concurrency is None else ""
        log.info("%s: %s -> %s (model %s, concurrency %d%s)", cls.name, opts.input, opts.output, serving.model_name, serving.concurrency, split)
        manifest = asyncio.run(process(generator, storage, opts, stop_on=stop_on))
    judged = f", {manifest.rows_rejected} rejected, {manifest.pairs_kept} pairs kept, {manifest.pairs_rejected} rejected {manifest.rejections_by_reason}" if manifest.rejected else ""
    log.info(
        "%s: %s%d rows in, %d out, %d failed %s%s, %d reused from earlier tries, %d model requests",
        manifest.generator, opts.attempt, manifest.rows_in, manifest.rows_out,
        manifest.rows_failed, manifest.failures_by_reason, judged, manifest.rows_reused, manifest.requests,
    )
    return manifest


