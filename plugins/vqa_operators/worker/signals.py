"""Stopping a run cleanly on SIGTERM or SIGINT: no new rows, requests in flight cancelled, finished rows checkpointed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

log = logging.getLogger("vqa_operators.worker")

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
                log.warning(
                    "%s received: taking no new rows, cancelling the requests in flight, checkpointing finished rows", sig.name
                )
                task.cancel()

        for sig in self.signals:
            loop.add_signal_handler(sig, stop, sig)
        try:
            yield self
        finally:
            for sig in self.signals:
                loop.remove_signal_handler(sig)
                signal.signal(sig, before[sig])
