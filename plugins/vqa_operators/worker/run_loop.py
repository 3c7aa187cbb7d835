"""The run: a shard's rows through a generator into the output, errors and rejected files, each finished row checkpointed.

``process`` turns the rows' outcomes (``rows.run_rows``) into final records (``records.Finished``)
and the files, with progress lines (``progress``) and a clean stop on signals (``signals``);
``run_job`` sets up the model server, media and generator and returns the stage's manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vqa_operators.exceptions import InputError, Interrupted, JobError, UnexpectedError
from vqa_operators.generators.base import PROVENANCE_KEY, Generator, input_line, origin_key, row_key
from vqa_operators.media import MediaReader
from vqa_operators.records import CHECKPOINT_FORMAT, Cost, Finished, RejectedEntry, StageManifest
from vqa_operators.serving.base import VLMServing
from vqa_operators.storage.checkpoint import Checkpoint, checkpoint_prefix, fingerprint
from vqa_operators.storage.jsonl import BadLine, JsonlWriter, read_jsonl
from vqa_operators.storage.uris import Storage
from vqa_operators.worker.backends import open_serving
from vqa_operators.worker.options import JobOptions, check_options
from vqa_operators.worker.progress import Progress, progress_batch
from vqa_operators.worker.rows import RowOutcome, run_rows
from vqa_operators.worker.signals import StopOnSignals

log = logging.getLogger("vqa_operators.worker")


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
        row[PROVENANCE_KEY] = _provenance(
            generator, outcome.row.get(PROVENANCE_KEY), origin_key(outcome.row), {"line": line, **made.meta}
        )
    return Finished(out=row, pairs_kept=made.pairs_kept, rejected=rejected)


def settings_fingerprint(generator: Generator, opts: JobOptions) -> str:
    """What decides each row's result: generator, options, prompts, model, sampling and image budget."""
    return fingerprint(
        {
            "format": CHECKPOINT_FORMAT,
            "generator": generator.name,
            **generator.provenance(),
            "max_pixels": opts.max_pixels,
            "media_root": opts.media_root,
        }
    )


async def process(
    generator: Generator, storage: Storage, opts: JobOptions, *, stop_on: tuple[signal.Signals, ...] = ()
) -> StageManifest:
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
        storage,
        checkpoint_prefix(opts.output, opts.task_key, run_fingerprint),
        every_rows=opts.checkpoint_every,
        every_seconds=opts.checkpoint_seconds,
    )
    keys: dict[int, str] = {}

    # the shard's byte range, if the input is the file that was split (a later stage reads its own file whole)
    shard = opts.shard if opts.shard and opts.shard.input == opts.input else None
    lines = (
        storage.iter_lines(opts.input, start=shard.start, end=shard.end, version=shard.version)
        if shard
        else storage.iter_lines(opts.input)
    )
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
            log.info(
                "%s: %s%d rows finished by earlier tries will be reused (checkpoint %s)",
                generator.name,
                opts.attempt,
                loaded,
                checkpoint.prefix,
            )
        await generator.serving.check()
        with contextlib.ExitStack() as files:
            out = JsonlWriter(files.enter_context(storage.open_atomic(opts.output)))
            err = JsonlWriter(files.enter_context(storage.open_atomic(opts.errors_uri)))
            # only a quality gate drops pairs: its rejected file is written even when it drops none
            rej = JsonlWriter(files.enter_context(storage.open_atomic(opts.rejected_uri))) if generator.gate else None
            try:
                async for outcome in run_rows(
                    generator, items(), concurrency=2 * opts.effective_concurrency, on_finished=finished
                ):
                    del keys[outcome.line]
                    record = outcome.record
                    assert record is not None
                    progress.add(record, outcome.reused)
                    if record.error is not None:
                        err.write(record.error.dump())
                    if record.out is not None:
                        out.write(record.out)
                        progress.pairs_out += (
                            record.pairs_kept if record.pairs_kept is not None else len(output_fields.pairs(record.out))
                        )
                    if rej is not None:
                        for entry in record.rejected:
                            rej.write(entry.dump())
                    if progress.due():
                        log.info("%s", progress.line(generator.usage))
                if shard is not None and progress.done != shard.rows:
                    raise InputError(
                        f"shard {shard.index} of {opts.input} has {progress.done} rows, not the {shard.rows} planned: the input changed"
                    )
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
    spent = {
        "requests": usage.requests,
        "repairs": usage.repairs,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }
    return StageManifest(
        generator=generator.name,
        input=opts.input,
        shard=opts.shard.index if opts.shard else None,
        try_number=opts.try_number,
        output=opts.output,
        errors=opts.errors_uri,
        rows_in=progress.done,
        rows_out=progress.out,
        rows_failed=progress.failed,
        rows_reused=progress.reused,
        failures_by_reason=dict(sorted(progress.reasons.items())),
        rejected=opts.rejected_uri if generator.gate else None,
        rows_rejected=progress.rows_rejected,
        pairs_kept=progress.pairs_kept,
        pairs_rejected=progress.pairs_rejected,
        rejections_by_reason=dict(sorted(progress.rejections.items())),
        model=generator.serving.model,
        prompt_sha256=generator.prompts.sha256,
        seed=opts.seed,
        checkpoint=checkpoint.prefix,
        **spent,
        pairs_out=progress.pairs_out,
        quality_scores=progress.scores,
        # this stage's model calls and tokens per pair it wrote (None: it wrote none)
        cost_per_pair=Cost.per(spent, progress.pairs_out),
        duration_s=round(time.monotonic() - progress.started, 3),
    )


def run_job(
    opts: JobOptions,
    *,
    storage: Storage | None = None,
    serving: VLMServing | None = None,
    stop_on: tuple[signal.Signals, ...] = (),
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
        media = MediaReader(
            storage, media_root=opts.media_root, max_pixels=opts.max_pixels, executor=executor, allowed_roots=opts.media_roots
        )
        generator = cls(serving, options=opts.params, media=media, seed=opts.seed, output=opts.output)
        split = (
            f", the server's budget split between {opts.sharing} shards" if opts.sharing > 1 and opts.concurrency is None else ""
        )
        log.info(
            "%s: %s -> %s (model %s, concurrency %d%s)",
            cls.name,
            opts.input,
            opts.output,
            serving.model,
            serving.concurrency,
            split,
        )
        manifest = asyncio.run(process(generator, storage, opts, stop_on=stop_on))
    judged = (
        f", {manifest.rows_rejected} rejected, {manifest.pairs_kept} pairs kept, {manifest.pairs_rejected} rejected {manifest.rejections_by_reason}"
        if manifest.rejected
        else ""
    )
    log.info(
        "%s: %s%d rows in, %d out, %d failed %s%s, %d reused from earlier tries, %d model requests",
        manifest.generator,
        opts.attempt,
        manifest.rows_in,
        manifest.rows_out,
        manifest.rows_failed,
        manifest.failures_by_reason,
        judged,
        manifest.rows_reused,
        manifest.requests,
    )
    return manifest
