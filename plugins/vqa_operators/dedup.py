"""Near-duplicate questions across a whole run: MinHash LSH, computed in batches and joined on disk, so memory stays flat.

Each text is lower-cased, stripped of punctuation and cut into character 3-grams (``shingles``).
Its MinHash signature (``NUM_PERM`` of datasketch's permutations over a 64-bit hash of each
3-gram) is computed for a batch of texts at once with numpy (``signatures``); datasketch chooses
the LSH bands (``b`` bands of ``r`` rows) for the threshold.

The index is a join on local disk, not a lookup per text: ``add_many`` appends each text's band
keys to bucket files by key (and its normalised text to SQLite); ``matches`` then sorts one bucket
at a time, pairs each text with the earlier texts that share a band key, counts the bands each
pair shares per block of texts (a block with more than ``MAX_PAIRS`` pairs split by text range
first), and resolves the blocks in order. Memory is bounded by a bucket and ``MAX_PAIRS``, not
by the run (``bench/dedup_memory.py``: the peak at 1M and 10M against 100k).

A text is a candidate of an earlier one when they share at least ``MIN_SHARED_BANDS`` bands; it
is a near-duplicate only if the exact Jaccard similarity of the two shingle sets reaches the
threshold (no LSH false positive rejects a pair), and only of a text that was itself kept. The
first occurrence is kept; later ones are reported.

Plain Python: it knows nothing of Airflow or of rows.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

NUM_PERM = 128
SHINGLE = 3
# SQLite's page cache for the normalised texts, in KiB
CACHE_KIB = 16 * 1024
# the LSH banding is chosen for (threshold - LSH_MARGIN) with datasketch's (false positive, false negative)
# weights: at the 0.8 default, 25 bands of 5 rows; a pair at 0.8 is a candidate unless its estimate falls far
LSH_MARGIN = 0.1
LSH_WEIGHTS = (0.05, 0.95)
# earlier kept texts checked exactly per new text, those sharing the most bands first
CANDIDATES = 16
# bands an earlier text must share to be checked: two texts at Jaccard J share each band with
# probability J**r, so at the 0.8 default (25 bands of 5 rows) a pair at 0.8 shares fewer than 2
# with probability 0.0007, while texts that share one band are mostly only of the same template
MIN_SHARED_BANDS = 2
# earlier texts paired per band key: templated questions ("How many ... are there?") share a few
# band keys with thousands of others, which says nothing about their other words; a text is paired
# with only the first POSTINGS texts of a key, so the work per text stays the same at a thousand
# pairs or a million (a near-duplicate shares about a third of its bands with its original, most
# of them not crowded)
POSTINGS = 8
# each text's sketch: the low byte of each of its band values (b-bit minwise hashing), kept beside its text; two
# texts at Jaccard J agree on a byte with probability J + (1 - J)/256, so over 125 bytes the estimate's standard
# deviation is 0.036 at 0.8. A candidate pair is checked exactly only if its estimate reaches the threshold less
# SKETCH_MARGIN (4 standard deviations at 0.8: a pair at the threshold is dropped here with probability 1e-5);
# texts of one template that share two bands mostly fall below it
SKETCH_MARGIN = 0.15
# candidate pairs whose sketches are compared at once
ESTIMATE_SLICE = 1 << 15
# texts whose signatures are computed together (their 3-grams' permuted hashes: 4 bytes x NUM_PERM each)
SIGNATURE_BATCH = 1024
# band-key buckets written while texts are added; a bucket larger than MAX_BUCKET records is split
# again by the next bits of the key before it is sorted, so a sort never holds more than that
BUCKET_BITS = 6
SPLIT_BITS = 4
MAX_BUCKET = 500_000
# texts per block of pairs counted and resolved together (more for a run of more than BLOCKS blocks)
BLOCK = 16_384
BLOCKS = 512
# pairs counted at once: a block holding more (later in a large run, where each text meets more earlier
# texts per key) is split by text range first, read MAX_PAIRS at a time, so that what is counted stays bounded
MAX_PAIRS = 1 << 19
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


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    common = len(a & b)
    return common / (len(a) + len(b) - common)


def _mix64(z: Any) -> Any:
    """SplitMix64's finalizer on uint64 (a fixed avalanching bijection): a 3-gram's code to its 64-bit hash."""
    import numpy as np

    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.cache
def _permutations() -> tuple[Any, Any]:
    """datasketch's MinHash permutations for ``NUM_PERM`` (its default scheme, affine modulo 2**32, and seed): ``(a, b)``, uint32."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=NUM_PERM).permutations
    return a, b


def _mix() -> Any:
    import numpy as np

    # fixed odd 64-bit multipliers: a band's key is the wrapping sum of its values times these (collisions are only candidates)
    return np.random.default_rng(20261130).integers(1, 1 << 63, size=NUM_PERM + 1, dtype=np.uint64) | np.uint64(1)


_MIX = _mix()


def signatures(norms: list[str], width: int = NUM_PERM) -> Any:
    """The first ``width`` MinHash values of each normalised text's 3-grams (``_grams``), ``(texts, width)`` uint32, for a batch at once.

    A 3-gram is coded by its three code points (21 bits each; a text shorter than 3 is padded with
    NUL, which ``normalise`` never leaves), hashed by ``_mix64``, and permuted by datasketch's
    permutations; a text's value per permutation is the minimum over its 3-grams.
    """
    import numpy as np

    lengths = np.fromiter((len(norm) for norm in norms), dtype=np.int64, count=len(norms))
    pad = "\0" * SHINGLE
    points = np.frombuffer("".join(norm + pad for norm in norms).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    grams = np.maximum(lengths - (SHINGLE - 1), 1)
    text_start = np.cumsum(lengths + SHINGLE) - (lengths + SHINGLE)
    gram_start = np.cumsum(grams) - grams
    positions = np.arange(int(grams.sum())) + np.repeat(text_start - gram_start, grams)
    codes = (points[positions] << np.uint64(42)) | (points[positions + 1] << np.uint64(21)) | points[positions + 2]
    hashes = (_mix64(codes) >> np.uint64(32)).astype(np.uint32)
    a, b = _permutations()
    # (permutations, 3-grams): the minimum runs along contiguous memory; uint32 wraps modulo 2**32, as datasketch's does
    permuted = a[:width, None] * hashes[None, :] + b[:width, None]
    return np.ascontiguousarray(np.minimum.reduceat(permuted, gram_start, axis=1).T)


@dataclass(frozen=True)
class Match:
    """The earlier kept text a new one nearly repeats (the most similar checked): its caller-given id and their Jaccard similarity."""

    first: Any
    similarity: float


class NearDuplicates:
    """Near-duplicate detection over a whole run: ``add_many`` every ``(text, id)`` in order, then ``matches()``.

    ``matches()`` yields, in the order added, None for a text that is kept, or the ``Match`` of the
    earlier kept text it nearly repeats. Use it as a context manager: the index lives in a temporary
    folder (``workdir``, default the system's temp folder) and is deleted on exit.
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
        self._root = Path(self._tmp.name)
        self._db = sqlite3.connect(self._root / "texts.sqlite", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size=-{CACHE_KIB}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute(
            "CREATE TABLE text (id INTEGER PRIMARY KEY, norm TEXT NOT NULL, first TEXT NOT NULL, sketch BLOB NOT NULL)"
        )
        self._db.execute("BEGIN")
        self._buckets: dict[int, BinaryIO] = {}
        self._matched = False
        self._disk_peak = 0
        self.added = 0
        self.kept = 0
        self.duplicates = 0

    def __enter__(self) -> NearDuplicates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._buckets.values():
            handle.close()
        self._db.close()
        self._tmp.cleanup()

    def disk_bytes(self) -> int:
        """The largest the index has been on local disk, in bytes, so far: texts, band keys and pairs."""
        return max(self._disk_peak, self._disk_now())

    def _disk_now(self) -> int:
        return sum(path.stat().st_size for path in self._root.rglob("*") if path.is_file())

    def add_many(self, texts: Iterable[tuple[str, Any]]) -> None:
        """Add each ``(text, id)`` in order (``id`` must be JSON): its normalised text, and its band keys to the buckets."""
        import numpy as np

        if self._matched:
            raise RuntimeError("add_many after matches(): the index has been resolved")
        batch: list[tuple[str, Any]] = []
        for item in texts:
            batch.append(item)
            if len(batch) == SIGNATURE_BATCH:
                self._add_batch(batch, np)
                batch = []
        if batch:
            self._add_batch(batch, np)

    def _add_batch(self, batch: list[tuple[str, Any]], np: Any) -> None:
        if self.added + len(batch) > 1 << 32:
            raise ValueError("the near-duplicate index numbers texts in 32 bits: at most 2**32 texts in a run")
        norms = [normalise(text) for text, _ in batch]
        signed = signatures(norms, self.bands * self.rows)
        sketches = (signed & np.uint32(0xFF)).astype(np.uint8)
        values = signed.astype(np.uint64)
        mixed = (values.reshape(len(batch), self.bands, self.rows) * _MIX[: self.rows]).sum(axis=2, dtype=np.uint64)
        keys = (mixed + np.arange(self.bands, dtype=np.uint64) * _MIX[-1]).ravel()
        ids = np.repeat(np.arange(self.added, self.added + len(batch), dtype=np.uint32), self.bands)
        self._db.executemany(
            "INSERT INTO text VALUES (?, ?, ?, ?)",
            (
                (self.added + n, norm, json.dumps(first), sketch.tobytes())
                for n, (norm, (_, first), sketch) in enumerate(zip(norms, batch, sketches, strict=True))
            ),
        )
        self.added += len(batch)
        _append_by_bucket(keys, ids, 64 - BUCKET_BITS, BUCKET_BITS, self._root / "keys", self._buckets)

    def matches(self) -> Iterator[Match | None]:
        """For each text added, in order: None if it is kept, else the ``Match`` of the earlier kept text it nearly repeats."""
        import numpy as np

        if self._matched:
            raise RuntimeError("matches() can be read once")
        self._matched = True
        self._db.execute("COMMIT")
        for handle in self._buckets.values():
            handle.close()
        buckets = sorted(self._buckets)
        self._buckets = {}
        block = max(BLOCK, math.ceil(self.added / BLOCKS))
        pair_files: dict[int, BinaryIO] = {}
        self._disk_peak = self._disk_now()
        for bucket in buckets:
            _pair_bucket(self._root / "keys" / f"{bucket}", 64 - BUCKET_BITS, block, self._root / "pairs", pair_files)
            self._disk_peak = max(self._disk_peak, self._disk_now())
        for handle in pair_files.values():
            handle.close()
        kept = np.zeros(self.added, dtype=bool)
        for start in range(0, self.added, block):
            yield from self._resolve_bounded(
                start, min(start + block, self.added), self._root / "pairs" / f"{start // block}", kept, np
            )

    def _resolve_bounded(self, start: int, end: int, path: Path, kept: Any, np: Any) -> Iterator[Match | None]:
        """``_resolve`` the texts ``start..end-1``, first split by text range while their pairs are more than ``MAX_PAIRS``;
        the files are deleted as they are read."""
        size = path.stat().st_size // 8 if path.exists() else 0
        if size <= MAX_PAIRS or end - start < 2:
            yield from self._resolve(start, end, path, kept, np)
            path.unlink(missing_ok=True)
            return
        parts = min(end - start, 2 * math.ceil(size / MAX_PAIRS))
        step = math.ceil((end - start) / parts)
        folder = path.with_name(path.name + ".split")
        handles: dict[int, BinaryIO] = {}
        with path.open("rb") as source:
            while len(piece := np.fromfile(source, dtype=np.uint64, count=MAX_PAIRS)):
                _append_grouped(piece, ((piece >> np.uint64(32)).astype(np.int64) - start) // step, folder, handles)
        for handle in handles.values():
            handle.close()
        path.unlink()
        self._disk_peak = max(self._disk_peak, self._disk_now())
        for low in range(start, end, step):
            yield from self._resolve_bounded(low, min(low + step, end), folder / f"{(low - start) // step}", kept, np)
        folder.rmdir()

    def _resolve(self, start: int, end: int, path: Path, kept: Any, np: Any) -> Iterator[Match | None]:
        """The texts ``start..end-1`` in order: each checked against its candidates that were kept, most shared bands first."""
        codes = np.fromfile(path, dtype=np.uint64) if path.exists() else np.empty(0, dtype=np.uint64)
        pairs, hits = np.unique(codes, return_counts=True)
        chosen = hits >= MIN_SHARED_BANDS
        pairs, hits = pairs[chosen], hits[chosen]
        later, earlier = (pairs >> np.uint64(32)).astype(np.int64), (pairs & np.uint64(0xFFFFFFFF)).astype(np.int64)
        if len(later):
            # the sketch estimate of each pair, a slice of pairs at a time, so memory stays bounded whatever the block holds
            ids = np.union1d(later, earlier)
            sketches = self._sketches(ids, np)
            close = np.empty(len(later), dtype=bool)
            for low in range(0, len(later), ESTIMATE_SLICE):
                high = low + ESTIMATE_SLICE
                agree = (
                    sketches[np.searchsorted(ids, later[low:high])] == sketches[np.searchsorted(ids, earlier[low:high])]
                ).mean(axis=1)
                close[low:high] = (agree - 1 / 256) / (1 - 1 / 256) >= self.threshold - SKETCH_MARGIN
            later, earlier, hits = later[close], earlier[close], hits[close]
            del sketches
        order = np.lexsort((earlier, -hits, later))
        later, earlier = later[order], earlier[order]
        kept[start:end] = True
        with_candidates = np.unique(later)
        kept[with_candidates] = False
        texts = self._texts(np.union1d(later, earlier)) if len(later) else {}
        bounds = np.searchsorted(later, with_candidates, side="right")
        found: dict[int, Match] = {}
        grams_of: dict[int, set[str]] = {}

        def grams_for(text: int) -> set[str]:
            if text not in grams_of:
                grams_of[text] = _grams(texts[text][0])
            return grams_of[text]

        low = 0
        for text, high in zip(with_candidates.tolist(), bounds.tolist(), strict=True):
            grams = grams_for(text)
            match, checked = None, 0
            for candidate in earlier[low:high].tolist():
                if not kept[candidate]:
                    continue
                similarity = jaccard(grams, grams_for(candidate))
                if similarity >= self.threshold and (match is None or similarity > match.similarity):
                    match = Match(json.loads(texts[candidate][1]), round(similarity, 3))
                checked += 1
                if checked == CANDIDATES:
                    break
            low = high
            if match is None:
                kept[text] = True
            else:
                found[text] = match
        self.duplicates += len(found)
        self.kept += end - start - len(found)
        for text in range(start, end):
            yield found.get(text)

    def _sketches(self, ids: Any, np: Any) -> Any:
        """The sketches of ``ids`` (sorted), ``(ids, bands * rows)`` uint8."""
        rows = self._db.execute(
            "SELECT sketch FROM text WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id", (json.dumps(ids.tolist()),)
        )
        return np.frombuffer(b"".join(row for (row,) in rows), dtype=np.uint8).reshape(len(ids), self.bands * self.rows)

    def _texts(self, ids: Any) -> dict[int, tuple[str, str]]:
        """Normalised text and caller's id (JSON) of each of ``ids``."""
        rows = self._db.execute(
            "SELECT id, norm, first FROM text WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids.tolist()),)
        )
        return {text: (norm, first) for text, norm, first in rows}


_RECORD = [("key", "<u8"), ("text", "<u4")]


def _append_grouped(records: Any, groups: Any, folder: Path, handles: dict[int, BinaryIO]) -> None:
    """Append each record to the file of its group in ``folder`` (opened once, kept in ``handles``), in their order within each group."""
    import numpy as np

    if not len(records):
        return
    order = np.argsort(groups, kind="stable")  # stable: each group keeps its records in order (of bytes, a radix sort)
    records, groups = records[order], groups[order]
    edges = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1], True])
    folder.mkdir(exist_ok=True)
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        index = int(groups[low])
        if index not in handles:
            handles[index] = (folder / f"{index}").open("ab")
        handles[index].write(records[low:high].tobytes())


def _append_by_bucket(keys: Any, ids: Any, shift: int, bits: int, folder: Path, handles: dict[int, BinaryIO]) -> None:
    """Append each (key, text id) record to the file of its bucket: the ``bits`` bits of the key above bit ``shift``."""
    import numpy as np

    records = np.empty(len(keys), dtype=_RECORD)
    records["key"], records["text"] = keys, ids
    _append_grouped(records, ((keys >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.uint8), folder, handles)


def _pair_bucket(path: Path, shift: int, block: int, pairs: Path, pair_files: dict[int, BinaryIO]) -> None:
    """Pair each text of a bucket with the first ``POSTINGS`` earlier texts of each key it holds; append the pairs by block.

    A bucket of more than ``MAX_BUCKET`` records is split by the next ``SPLIT_BITS`` bits of the
    key first (read in pieces), so what is sorted at once stays bounded whatever the run's size.
    The file is deleted once its pairs are written.
    """
    import numpy as np

    size = path.stat().st_size // np.dtype(_RECORD).itemsize
    if size > MAX_BUCKET and shift >= SPLIT_BITS:
        handles: dict[int, BinaryIO] = {}
        folder = path.with_name(path.name + ".split")
        with path.open("rb") as source:
            while len(piece := np.fromfile(source, dtype=_RECORD, count=MAX_BUCKET)):
                # pieces are read in file order and split stably, so each part keeps its texts in order
                _append_by_bucket(piece["key"], piece["text"], shift - SPLIT_BITS, SPLIT_BITS, folder, handles)
        for handle in handles.values():
            handle.close()
        path.unlink()
        for part in sorted(handles):
            _pair_bucket(folder / f"{part}", shift - SPLIT_BITS, block, pairs, pair_files)
        folder.rmdir()
        return
    records = np.fromfile(path, dtype=_RECORD)
    path.unlink()
    # records were appended in text order; a stable sort by key keeps each key's texts in that order
    order = np.argsort(records["key"], kind="stable")
    keys, texts = records["key"][order], records["text"][order]
    if len(keys) < 2:
        return
    opens = np.empty(len(keys), dtype=bool)
    opens[0], opens[1:] = True, keys[1:] != keys[:-1]
    group_start = np.flatnonzero(opens)[np.cumsum(opens) - 1]
    rank = np.arange(len(keys)) - group_start
    members = np.flatnonzero(rank > 0)
    # one posting at a time: at most one pair per record is held (a crowded run pairs most records with all POSTINGS)
    for posting in range(POSTINGS):
        members = members[rank[members] > posting]
        if not len(members):
            break
        later, earlier = texts[members], texts[group_start[members] + posting]
        distinct = later != earlier  # two bands of one text whose keys collide
        codes = (later[distinct].astype(np.uint64) << np.uint64(32)) | earlier[distinct].astype(np.uint64)
        _append_grouped(codes, (codes >> np.uint64(32)).astype(np.int64) // block, pairs, pair_files)
