"""Near-duplicates at a million pairs and more: peak RSS and speed of ``dedup.NearDuplicates`` at 100k, 1M (and, with ``--huge``, 10M) questions.

Each size runs in a fresh process (``--child N``) under GNU ``time -f %M``, as ``bench/memory.py``
does, so the peak is the index's and not this process's. The questions are made by a seeded
generator, streamed in batches as ``merge`` does: templated questions over a 2,000-word vocabulary
(the shape of a VLM's questions: "How many red cars are parked by the gate?"), of which about 1 in
20 repeats an earlier question with a small edit (a word dropped or a typo). Threshold: the default
(``settings.NEAR_DUPLICATE_THRESHOLD``).

    .venv/bin/python bench/dedup_memory.py [--small 100000] [--large 1000000] [--huge 10000000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator

from common import PYTHON, ROOT, Result, print_table

from vqa_operators import settings
from vqa_operators.dedup import NearDuplicates

TEMPLATES = (
    "How many {a} {b} are {p} the {c}?",
    "What colour is the {a} {b} {p} the {c}?",
    "Is the {b} {p} the {c} {a}?",
    "What is the {b} {p} the {c} used for?",
    "Why is the {a} {b} next to the {c} {d}?",
    "Which {b} is closest to the {a} {c}?",
    "What does the {b} on the {c} say about the {d}?",
    "Where is the {a} {b} relative to the {c}?",
)
PLACES = ("on", "under", "behind", "in front of", "next to", "inside", "above", "near")
EDIT_EVERY = 20
BATCH = 512


def vocabulary(rng: random.Random, size: int = 2000) -> list[str]:
    """``size`` distinct pronounceable words."""
    consonants, vowels = "bcdfghklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def questions(count: int, seed: int = 7) -> Iterator[str]:
    """``count`` questions: templated ones, and every ``EDIT_EVERY``-th an edited repeat of a recent one."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    recent: list[str] = []
    for i in range(count):
        if i % EDIT_EVERY == EDIT_EVERY - 1 and recent:
            tokens = rng.choice(recent).split()
            if rng.random() < 0.5 and len(tokens) > 6:
                del tokens[rng.randrange(1, len(tokens) - 1)]  # a word dropped
            else:
                j = rng.randrange(len(tokens))
                tokens[j] = tokens[j][:-1] + "x"  # a typo
            yield " ".join(tokens)
            continue
        text = rng.choice(TEMPLATES).format(
            a=rng.choice(words), b=rng.choice(words), c=rng.choice(words), d=rng.choice(words), p=rng.choice(PLACES)
        )
        recent = [*recent[-999:], text]
        yield text


def child(count: int) -> None:
    """Add ``count`` questions to the index, then read every verdict in order; print its figures as one JSON line."""
    started = time.monotonic()
    with NearDuplicates(settings.NEAR_DUPLICATE_THRESHOLD) as index:
        index.add_many((text, i) for i, text in enumerate(questions(count)))
        added = time.monotonic()
        found = sum(match is not None for match in index.matches())
        print(
            json.dumps(
                {
                    "count": count,
                    "seconds": time.monotonic() - started,
                    "add_seconds": added - started,
                    "kept": index.kept,
                    "duplicates": found,
                    "disk_bytes": index.disk_bytes(),
                }
            )
        )


def measure(count: int) -> tuple[float, dict]:
    """(peak RSS in MiB, the child's figures) for ``count`` questions."""
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss_kb=%M", PYTHON, __file__, "--child", str(count)],
        env={"PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dedup child failed: {proc.stderr[-2000:]}")
    return int(proc.stderr.strip().splitlines()[-1].removeprefix("maxrss_kb=")) / 1024, json.loads(
        proc.stdout.strip().splitlines()[-1]
    )


# today's figure: the SQLite index looked up per text (before the batched join), README measure 10
PER_TEXT_INDEX_US = 574


def run(small: int = 100_000, large: int = 1_000_000, huge: int | None = None) -> list[Result]:
    sizes = [small, large] + ([huge] if huge else [])
    figures = {count: measure(count) for count in sizes}
    small_mb = figures[small][0]
    results = []
    for count in sizes[1:]:
        mb, fig = figures[count]
        results.append(
            Result(
                f"10. near-duplicates, flat memory at {count // 1000}k",
                f"{mb:.0f} MB at {count // 1000}k / {small_mb:.0f} MB at {small // 1000}k = {mb / small_mb:.2f}",
                "ratio <= 1.3",
                mb / small_mb <= 1.3,
                f"peak RSS of a process streaming questions through dedup.NearDuplicates (threshold {settings.NEAR_DUPLICATE_THRESHOLD}); "
                f"index on disk at its largest {fig['disk_bytes'] / 2**20:.0f} MB at {count // 1000}k",
            )
        )
    for count in sizes[1:]:
        fig = figures[count][1]
        per_text = 1e6 * fig["seconds"] / count
        results.append(
            Result(
                f"10. near-duplicates, speed at {count // 1000}k",
                f"{per_text:.0f} µs per question at {count // 1000}k ({1e6 * figures[small][1]['seconds'] / small:.0f} at {small // 1000}k): "
                f"{PER_TEXT_INDEX_US / per_text:.1f}x the per-text index's {PER_TEXT_INDEX_US} µs",
                ">= 10x at 1M" if count == 1_000_000 else "reported",
                PER_TEXT_INDEX_US / per_text >= 10 if count == 1_000_000 else None,
                f"{fig['seconds']:.0f} s for {count:,} (adding {fig['add_seconds']:.0f} s, with the questions' generation); {fig['duplicates']:,} "
                f"near-duplicates found; the input holds {count // EDIT_EVERY:,} edited repeats (an edit of a short question can fall below the threshold) "
                "and questions of one template that match by chance",
            )
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--huge", type=int, default=None, help="a third size, e.g. 10000000 (about 10 minutes here)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        sys.exit(0)
    print_table(run(args.small, args.large, args.huge))
