"""Near-duplicate questions across a whole run: MinHash LSH (datasketch) over an on-disk index, so memory stays flat.

Each text is lower-cased, stripped of punctuation and cut into character 3-grams (``shingles``);
datasketch computes its MinHash signature (``NUM_PERM`` permutations) and chooses the LSH bands
(``b`` bands of ``r`` rows) for the threshold. The bands of every kept text go into an SQLite
table on local disk, not into datasketch's in-memory index: its dict holds every band of every
text, several GB for a million pairs, while SQLite's page cache is capped (``CACHE_KIB``), so
memory stays the same for a thousand pairs or a million (``bench/dedup_memory.py``). A text
whose band collides with an earlier text's is a candidate; it is a near-duplicate only if the
exact Jaccard similarity of the two shingle sets reaches the threshold (no LSH false positive
rejects a pair). The first occurrence is kept; later ones are reported.

Plain Python: it knows nothing of Airflow or of rows.
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NUM_PERM = 128
SHINGLE = 3
# SQLite's page cache, in KiB: the index's memory whatever the run's size
CACHE_KIB = 32 * 1024
# the LSH banding is chosen for (threshold - LSH_MARGIN) with datasketch's (false positive, false negative)
# weights: at the 0.8 default, 25 bands of 5 rows; a pair at 0.8 is a candidate unless its estimate falls far
LSH_MARGIN = 0.1
# earlier texts checked exactly per new text, those sharing the most bands first
CANDIDATES = 16
# bands an earlier text must share to be checked: two texts at Jaccard J share each band with
# probability J**r, so at the 0.8 default (25 bands of 5 rows) a pair at 0.8 shares fewer than 2
# with probability 0.0007, while texts that share one band are mostly only of the same template
MIN_SHARED_BANDS = 2
# texts read per band: templated questions ("How many ... are there?") share a few bands with
# thousands of others, which says nothing about their other words; only a band's first POSTINGS
# texts are read, so the work per text stays the same at a thousand pairs or a million (a
# near-duplicate shares about a third of its bands with its original, most of them not crowded)
POSTINGS = 64
LSH_WEIGHTS = (0.05, 0.95)
_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalise(text: str) -> str:
    """Lower case, punctuation and whitespace runs as one space: ``"What's  the colour?"`` -> ``"what s the colour"``."""
    return _WORD.sub(" ", text.lower()).strip()


def shingles(text: str) -> set[str]:
    """The character ``SHINGLE``-grams of the normalised text (the whole text if it is shorter)."""
    return _grams(normalise(text))


def _grams(norm: str) -> set[str]:
    """The character ``SHINGLE``-grams of an already normalised text."""
    if len(norm) <= SHINGLE:
        return {norm}
    return {norm[i : i + SHINGLE] for i in range(len(norm) - SHINGLE + 1)}


def _mix() -> Any:
    import numpy as np

    # fixed odd 64-bit multipliers: a band's key is the wrapping sum of its values times these (collisions are only candidates)
    return np.random.default_rng(20261130).integers(1, 1 << 63, size=NUM_PERM + 1, dtype=np.uint64) | np.uint64(1)


_MIX = _mix()


@functools.lru_cache(maxsize=1 << 16)
def _shingle_hash(data: bytes) -> int:
    """datasketch's own 32-bit SHA-1 hash, remembered: a run's questions share a few thousand 3-grams."""
    from datasketch.hashfunc import sha1_hash32

    return sha1_hash32(data)


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    common = len(a & b)
    return common / (len(a) + len(b) - common)


@dataclass(frozen=True)
class Match:
    """The earlier kept text a new one nearly repeats (the most similar checked): its caller-given id and their Jaccard similarity."""

    first: Any
    similarity: float


class NearDuplicates:
    """Streaming near-duplicate detection: ``check(text, id)`` returns the earlier match, or keeps ``text`` and returns None.

    Use it as a context manager: the index lives in a temporary folder (``workdir``, default the
    system's temp folder) and is deleted on exit.
    """

    def __init__(self, threshold: float, *, workdir: str | Path | None = None) -> None:
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"the near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        # only for its banding (b bands of r rows), set below the threshold and weighted against missed duplicates:
        # a short question has few shingles, so its MinHash estimate varies; every candidate is checked exactly
        lsh = MinHashLSH(threshold=max(threshold - LSH_MARGIN, 0.05), num_perm=NUM_PERM, weights=LSH_WEIGHTS)
        self.bands, self.rows = lsh.b, lsh.r
        self._tmp = tempfile.TemporaryDirectory(prefix="vqa-dedup-", dir=workdir)
        self._db = sqlite3.connect(Path(self._tmp.name) / "index.sqlite", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size=-{CACHE_KIB}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE band (k INTEGER NOT NULL, text INTEGER NOT NULL, PRIMARY KEY (k, text)) WITHOUT ROWID")
        self._db.execute("CREATE TABLE kept (text INTEGER PRIMARY KEY, norm TEXT NOT NULL, first TEXT NOT NULL)")
        self._db.execute("BEGIN")
        # each band's first POSTINGS texts, read through the primary key; of those, the ones sharing enough bands
        postings = " UNION ALL ".join([f"SELECT text FROM (SELECT text FROM band WHERE k = ? LIMIT {POSTINGS})"] * self.bands)  # noqa: S608 - constants only
        self._candidates_sql = (
            f"SELECT kept.text, kept.norm, kept.first FROM (SELECT text, COUNT(*) AS hits FROM ({postings}) GROUP BY text"  # noqa: S608 - constants only
            f" HAVING hits >= {MIN_SHARED_BANDS} ORDER BY hits DESC, text LIMIT {CANDIDATES}) AS best JOIN kept ON best.text = kept.text"
            " ORDER BY best.hits DESC, kept.text"
        )
        self.kept = 0
        self.duplicates = 0

    def __enter__(self) -> NearDuplicates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()
        self._tmp.cleanup()

    def disk_bytes(self) -> int:
        """The size of the index, in bytes (on local disk, once its pages leave the capped cache)."""
        (pages,) = self._db.execute("PRAGMA page_count").fetchone()
        (size,) = self._db.execute("PRAGMA page_size").fetchone()
        return int(pages * size)

    def _band_keys(self, signatures: Any) -> Any:
        """Each signature's band keys, ``(texts, bands)`` int64: each band's ``r`` values mixed into one 64-bit key."""
        import numpy as np

        values = np.stack([sig.hashvalues for sig in signatures])[:, : self.bands * self.rows].astype(np.uint64)
        mixed = (values.reshape(len(signatures), self.bands, self.rows) * _MIX[: self.rows]).sum(axis=2, dtype=np.uint64)
        return (mixed + np.arange(self.bands, dtype=np.uint64) * _MIX[-1]).view(np.int64)

    def check_many(self, texts: Iterable[tuple[str, Any]]) -> list[Match | None]:
        """``check`` for each ``(text, id)`` in order (signatures computed together: faster). ``id`` must be JSON."""
        from datasketch import MinHash

        items = list(texts)
        sets = [shingles(text) for text, _ in items]
        signatures = MinHash.bulk([[s.encode("utf-8") for s in shingle_set] for shingle_set in sets], num_perm=NUM_PERM, hashfunc=_shingle_hash)
        results: list[Match | None] = []
        if not items:
            return results
        band_keys = self._band_keys(signatures).tolist()
        for (text, first), shingle_set, keys in zip(items, sets, band_keys, strict=True):
            norm = normalise(text)
            # the earlier texts sharing the most bands with this one (the likeliest to be similar), at most CANDIDATES of them
            candidates = self._db.execute(self._candidates_sql, keys).fetchall()
            match = None
            for _, earlier_norm, earlier in candidates:
                similarity = jaccard(shingle_set, _grams(earlier_norm))
                if similarity >= self.threshold and (match is None or similarity > match.similarity):
                    match = Match(json.loads(earlier), round(similarity, 3))
            if match is None:
                self.kept += 1
                text_id = self.kept
                self._db.execute("INSERT INTO kept VALUES (?, ?, ?)", (text_id, norm, json.dumps(first)))
                self._db.executemany("INSERT OR IGNORE INTO band VALUES (?, ?)", [(k, text_id) for k in keys])
            else:
                self.duplicates += 1
            results.append(match)
        return results

    def check(self, text: str, first: Any) -> Match | None:
        """None if ``text`` is new (it is kept, under the id ``first``), else the earlier kept text it nearly repeats."""
        return self.check_many([(text, first)])[0]

