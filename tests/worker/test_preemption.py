"""Preemption: SIGTERM (a spot node reclaimed, a pod evicted, a task stopped) or SIGINT mid-run keeps the finished rows.

The worker CLI runs in a child process, as in a pod, against the test double. The double answers
the first half of the rows and holds the other half's requests unanswered (``OpenAITestServer.hold``,
by each row's request seed), so the signal always lands mid-run, whatever the machine's speed. The checkpoint is set so that it
never flushes on its own during the run (every 100,000 rows or 10 minutes): whatever the rerun
reuses was saved by the worker's own handling of the signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit.data import MODEL, row_seeds, write_image_rows
from testkit.openai_server import OpenAITestServer
from tests.helpers import ROOT, checkpointed_rows, wait_for_progress

ROWS = 40


def _worker(server: OpenAITestServer, folder: Path, source: Path) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "vqa_operators",
        "run",
        "image_qa",
        "--input",
        str(source),
        "--output",
        str(folder / "out" / "rows.jsonl"),
        "--base-url",
        server.base_url,
        "--model",
        MODEL,
        "--media-root",
        str(folder / "media"),
        "--concurrency",
        "4",
        "--seed",
        "3",
        "--checkpoint-every",
        "100000",
        "--checkpoint-seconds",
        "600",
        "--param",
        "pairs_per_row=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_checkpoints_finished_rows_and_the_rerun_sends_only_the_rest(
    vlm_server: OpenAITestServer, tmp_path: Path, sig: signal.Signals
) -> None:
    source = write_image_rows(tmp_path, ROWS)
    later = {seed for row, seed in row_seeds(source, 3).items() if row >= ROWS // 2}
    vlm_server.hold(lambda body: body.get("seed") in later)  # the first half of the rows are answered, the rest wait
    proc = _worker(vlm_server, tmp_path, source)
    try:
        wait_for_progress(proc.stderr, "image_qa", ROWS // 2)
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=60)
        # it stopped while its requests were still unanswered: it cancelled them, it did not wait for them
        still_held = vlm_server.held
    finally:
        proc.kill()
        vlm_server.release()
    assert proc.returncode == 128 + int(sig), rest
    assert still_held >= 1, "the worker stopped only once the server answered"
    last = rest.strip().splitlines()[-1]
    assert last.startswith(f"vqa_operators: Interrupted: {sig.name}: stopped: "), last
    assert "checkpointed, so the next try sends only the other rows" in last
    assert not (tmp_path / "out" / "rows.jsonl").exists(), "an interrupted run writes no output"
    saved = checkpointed_rows(tmp_path / "out")
    # exactly the rows the server answered: every finished row is saved, and no other row could finish
    assert saved == ROWS // 2 and vlm_server.holding.is_set()
    assert f": {saved} rows finished ({saved} this try, 0 reused)" in last

    vlm_server.reset()
    rerun = _worker(vlm_server, tmp_path, source)
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    manifest = json.loads(out.strip().splitlines()[-1])
    assert manifest["rows_reused"] == saved
    # one request per row (the double's answers need no repair): only the rows the first run did not finish
    assert len(vlm_server.requests) == manifest["requests"] == ROWS - saved
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == list(range(ROWS))


def test_a_signal_before_any_row_stops_at_once_with_the_signals_code(tmp_path: Path) -> None:
    """While --serve-vllm waits for a server that never becomes healthy, SIGTERM still stops the worker, and its server."""
    source = write_image_rows(tmp_path, 2)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "plugins"),
        # a "server" that never answers /health: the worker waits for it until the signal
        "VQA_VLLM_COMMAND": f"{sys.executable} -c 'import time; time.sleep(600)' --",
    }
    argv = [
        sys.executable,
        "-m",
        "vqa_operators",
        "run",
        "image_qa",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--model",
        MODEL,
        "--serve-vllm",
        "--media-root",
        str(tmp_path / "media"),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("starting model server:"):
                break
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=40)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert rest.strip().splitlines()[-1] == "vqa_operators: Interrupted: SIGTERM: stopped: before any row ran"
    assert took < 20, f"the worker took {took:.1f}s to stop"


def test_in_process_a_signal_raises_interrupted_with_what_the_try_did_and_the_rerun_reuses_it(
    vlm_server: OpenAITestServer, tmp_path: Path
) -> None:
    """What an in-process Airflow task does when Airflow stops it (SIGINT, then SIGTERM): run_job in this, the main, thread."""
    import threading

    from testkit.data import job_options
    from vqa_operators.exceptions import Interrupted
    from vqa_operators.worker import run_job
    from vqa_operators.worker.signals import STOP_SIGNALS

    source = write_image_rows(tmp_path, ROWS)
    vlm_server.latency = 0.2
    opts = job_options(vlm_server, tmp_path, source, concurrency=4, checkpoint_every=100_000, checkpoint_seconds=600.0)

    def stop_when_busy() -> None:
        deadline = time.monotonic() + 30
        while len(vlm_server.requests) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_busy)
    stopper.start()
    try:
        with pytest.raises(Interrupted) as stopped:
            run_job(opts, stop_on=STOP_SIGNALS)
    finally:
        stopper.join()
    assert stopped.value.exit_code == 143 and stopped.value.progress is not None
    finished = stopped.value.progress.rows_finished
    # the 12th request left only after 8 answers came back (4 in flight); every finished row was saved
    assert 4 <= finished < ROWS and checkpointed_rows(tmp_path / "out") == finished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is this run's only

    vlm_server.reset()
    manifest = run_job(opts)
    assert manifest.rows_reused == finished and manifest.requests == ROWS - finished
