"""``make bench``: every performance measure, one after another in one run, printed as one Markdown table.

Each measure is also a script of its own (``bench/<name>.py``) with its settings as flags. The
model server is the TEST DOUBLE simulating a continuous-batching server (``bench/common.py``), not
a model; the figures measure this machine's client side: scheduling, image preparation, memory,
parsing, fan-out and video decoding. One measure runs against real vLLM (its CPU build, ``vllm_client``): our
worker's request throughput against vLLM's own benchmark client's, on the same server. They are
run one at a time, since they share the cores.

    .venv/bin/python bench/run.py [--only saturation,memory]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import dedup_memory
import image_prep
import memory
import parse_time
import quality
import saturation
import scaling
import shared_server
import video_ingest
import video_path
import vllm_client
from common import print_table

MEASURES = {
    "saturation": saturation.run,
    "video_path": video_path.run,
    "memory": memory.run,
    "image_prep": image_prep.run,
    "parse_time": parse_time.run,
    "scaling": scaling.run,
    "vllm_client": vllm_client.run,
    "quality": quality.run,
    "dedup_memory": dedup_memory.run,
    "video_ingest": video_ingest.run,
    "shared_server": shared_server.run,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(MEASURES), help="comma-separated measures to run")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(MEASURES)
    if unknown:
        parser.error(f"unknown measures {sorted(unknown)}; choose from {sorted(MEASURES)}")
    started = time.monotonic()
    results = []
    for name in chosen:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results += MEASURES[name]()
    print(f"\n{os.cpu_count()} cores, Python {platform.python_version()}, {time.monotonic() - started:.0f} s\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
