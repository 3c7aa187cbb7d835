"""The benches' own harness starts: the simulated server they all share comes up from its file and reports its stats."""

from __future__ import annotations

import json
import urllib.request


def test_the_benches_simulated_server_starts_and_serves() -> None:
    from bench.common import sim_server

    with sim_server(slots=2, latency=0.01) as server:
        with urllib.request.urlopen(server.base_url + "/models", timeout=10) as resp:
            served = [m["id"] for m in json.loads(resp.read())["data"]]
        stats = server.stats()
    assert served == ["test-vlm"]
    assert stats == {"requests": 0, "span_s": 0.0, "peak_concurrency": 0}  # listing models is not a chat request
