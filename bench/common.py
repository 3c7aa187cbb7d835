"""What the benchmarks share: the simulated model server in its own process, photo-like inputs, a result row.

The model server is the TEST DOUBLE (``testkit/openai_server.py``) in continuous-batching
mode: at most ``slots`` requests are served at once for ``latency`` seconds each, the rest queue;
it checks image headers only and reports its own timings at ``GET /stats``. It runs in a separate
process, as a GPU server would be a separate machine, so its work does not share the worker's GIL.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

from testkit.data import MODEL, photo  # noqa: E402

PYTHON = sys.executable


@dataclass
class Result:
    """One line of the bench table: the figure, the target it is checked against, and whether it is met."""

    measure: str
    figure: str
    target: str
    met: bool | None
    detail: str = ""


def print_table(results: list[Result]) -> None:
    """The results as one Markdown table."""
    print("| measure | figure | target | met | detail |")
    print("|---|---|---|---|---|")
    for r in results:
        met = "—" if r.met is None else ("yes" if r.met else "**no**")
        print(f"| {r.measure} | {r.figure} | {r.target} | {met} | {r.detail} |")


class SimServer:
    """A handle on a simulated server process: its base URL and its server-side stats."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        url = self.base_url.removesuffix("/v1") + ("/stats?reset" if reset else "/stats")
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())


@contextlib.contextmanager
def sim_server(*, slots: int | None, latency: float) -> Iterator[SimServer]:
    """Start the double as a continuous-batching server (``slots`` None: unlimited, header checks only)."""
    argv = [PYTHON, str(ROOT / "testkit" / "openai_server.py"), MODEL, "--port", "0", "--latency", str(latency), "--light"]
    argv += ["--slots", str(slots or 100_000)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if " at " not in line:
            raise RuntimeError(f"simulated server did not start: {line!r}")
        yield SimServer(line.rsplit(" at ", 1)[1].strip())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_photos(folder: Path, count: int, size: tuple[int, int], quality: int = 90) -> list[str]:
    """``count`` distinct photo-like JPEGs of ``size`` in ``folder``; their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"p{size[0]}x{size[1]}-{i:03d}.jpg"
        buffer = io.BytesIO()
        photo(size, seed=i).save(buffer, format="JPEG", quality=quality)
        (folder / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
