"""Read and atomically write local files and S3 objects addressed by one URI string.

S3 is reached with boto3, so the standard AWS environment variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_REGION`` ...) select the endpoint and credentials; an Airflow task
can instead hand in a client built from its connection.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from vqa_operators.exceptions import InputError, JobError, StorageError

log = logging.getLogger("vqa_operators.storage")

# S3 error codes that say the service, not the object, failed
TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    }
)
# S3's answers that an object is not there
MISSING_S3_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
# a resumed read's pause before attempt n: RESUME_BASE_S * 2**n, at most RESUME_CAP_S, with full jitter
RESUME_BASE_S = 0.05
RESUME_CAP_S = 5.0
# S3's single-PutObject limit; larger files go up as a multipart upload
S3_PUT_LIMIT = 5 * 1024**3
S3_PART_SIZE = 256 * 1024**2
# user metadata holding the content's sha256, so an identical rewrite can be skipped
SHA256_METADATA = "sha256"


@dataclass(frozen=True)
class ObjectVersion:
    """What a conditional write compares: the version token, and the content hash if one was recorded."""

    token: str
    sha256: str | None


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into (bucket, key); raise ValueError if either is empty."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key


def join_uri(root: str, path: str) -> str:
    """Resolve ``path`` against ``root`` (a folder or an ``s3://`` prefix); absolute paths and URIs win."""
    if is_s3(path) or os.path.isabs(path):
        return path
    if is_s3(root):
        return root.rstrip("/") + "/" + path.removeprefix("./")
    return os.path.normpath(os.path.join(root, path))


def dot_segments(uri: str) -> bool:
    """True if a segment of ``uri``'s path is ``.`` or ``..``: S3 would not resolve it, and no allowed location holds one."""
    path = uri[len("s3://") :].partition("/")[2] if is_s3(uri) else uri
    return any(part in (".", "..") for part in path.replace("\\", "/").split("/"))


def within(uri: str, root: str) -> bool:
    """True if ``uri`` lies inside ``root`` (or is it): a folder (symlinks resolved) or an ``s3://bucket[/prefix]``.

    An S3 key with a ``..`` or ``.`` segment is never inside anything: S3 would not resolve it.
    """
    if is_s3(uri) != is_s3(root):
        return False
    if is_s3(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        root_bucket, _, prefix = root[len("s3://") :].partition("/")
        if dot_segments(uri):
            return False
        prefix = prefix.rstrip("/")
        return bucket == root_bucket and (not prefix or key.rstrip("/") == prefix or key.startswith(prefix + "/"))
    real, real_root = os.path.realpath(uri), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


def beside(output_uri: str, suffix: str) -> str:
    """``.../name.jsonl`` -> ``.../name<suffix>``: a file or prefix kept next to an output."""
    return output_uri.removesuffix(".jsonl") + suffix


def errors_uri_for(output_uri: str) -> str:
    """``.../name.jsonl`` -> ``.../name.errors.jsonl``: the default errors file beside an output."""
    return beside(output_uri, ".errors.jsonl")


def rejected_uri_for(output_uri: str) -> str:
    """``.../name.jsonl`` -> ``.../name.rejected.jsonl``: the pairs (and rows) quality decisions dropped, beside an output."""
    return beside(output_uri, ".rejected.jsonl")


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (``NoSuchKey``, ``AccessDenied`` ...), else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def definite(exc: BaseException) -> bool:
    """True if S3 answered about the object itself (missing, forbidden, a failed condition ...): another attempt gets
    the same answer. No answer (a dropped connection, a cut-off body, a timeout), a 5xx and throttling are the store's
    faults, which pass."""
    code = s3_error_code(exc)
    if code is None or code in TRANSIENT_S3_CODES:
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")  # type: ignore[attr-defined]
    if isinstance(status, int):
        return 400 <= status < 500 and status not in (408, 429)
    return not code.startswith("5")


def store_config() -> Any:
    """The botocore Config of every S3 client this package makes: ``VQA_S3_MAX_ATTEMPTS`` attempts, adaptive mode."""
    from botocore.config import Config

    from vqa_operators import settings

    return Config(retries={"mode": "adaptive", "total_max_attempts": settings.environment().s3_max_attempts})


def _pause(attempt: int) -> None:
    time.sleep(random.uniform(0, min(RESUME_CAP_S, RESUME_BASE_S * 2**attempt)))


class Storage:
    """One way to read and write URIs; S3 access goes through a single (thread-safe) boto3 client."""

    def __init__(self, s3_client: Any | None = None) -> None:
        if s3_client is not None:
            self.__dict__["s3"] = s3_client

    @cached_property
    def s3(self) -> Any:
        """The boto3 S3 client, created on first use from the standard AWS environment."""
        import boto3

        return boto3.client("s3", config=store_config())

    @cached_property
    def attempts(self) -> int:
        """Attempts at a read that fails without a definite answer (``VQA_S3_MAX_ATTEMPTS``)."""
        from vqa_operators import settings

        return settings.environment().s3_max_attempts

    def _s3_error(self, uri: str, exc: Exception) -> JobError:
        """S3's answer about the input itself (NoSuchKey, AccessDenied ...) is an InputError, which another try
        would meet again; no answer, or a server-side one (5xx, throttling), is a StorageError, which a retry may clear."""
        if not definite(exc):
            return self._fault(uri, exc)
        return InputError(f"cannot read {uri}: {s3_error_code(exc)}")

    def _fault(self, uri: str, exc: Exception) -> StorageError:
        """A store fault that outlasted every attempt: the job's failure (exit 5), which Airflow's retry may clear."""
        return StorageError(f"cannot read {uri}: {s3_error_code(exc) or type(exc).__name__} (after {self.attempts} attempts)")

    def _read_s3(
        self, uri: str, *, start: int = 0, end: int | None = None, version: str | None = None
    ) -> Generator[bytes, None, None]:
        """The bytes ``[start, end)`` of an object in chunks; a body cut off mid-way is read on from where it stopped.

        boto attempts each GET itself (``store_config``); what it does not attempt again is a body that
        breaks off after the answer began, and that is what this resumes, up to ``attempts`` times in a row.

        Every resumed GET is conditional on the ETag the first one saw (or ``version``), so the bytes are all
        of one version of the object; a change in between is a PreconditionFailed, as for ``version``.
        """
        bucket, key = split_s3(uri)
        position, failures = start, 0
        etag = version
        while end is None or position < end:
            extra: dict[str, str] = {}
            if position or end is not None:
                extra["Range"] = f"bytes={position}-{'' if end is None else end - 1}"
            if etag is not None:
                extra["IfMatch"] = etag
            try:
                response = self.s3.get_object(Bucket=bucket, Key=key, **extra)
            except Exception as exc:
                if position > start and s3_error_code(exc) == "InvalidRange":
                    return  # the object ended exactly where the cut-off read did
                raise
            etag = etag or response.get("ETag")
            body = response["Body"]
            try:
                with contextlib.closing(body):
                    while chunk := body.read(1 << 16):
                        position += len(chunk)
                        failures = 0
                        yield chunk
                return
            except Exception as exc:  # a dropped connection or a short body: urllib3 / botocore errors
                if definite(exc) or failures + 1 >= self.attempts:
                    raise
                failures += 1
                log.warning(
                    "S3 read of %s cut off at byte %d (%s); reading on, attempt %d of %d",
                    uri,
                    position,
                    type(exc).__name__,
                    failures + 1,
                    self.attempts,
                )
                _pause(failures)

    def iter_lines(
        self, uri: str, *, start: int = 0, end: int | None = None, version: str | None = None, keepends: bool = False
    ) -> Iterator[bytes]:
        """Stream the lines of a file or object, or of its bytes ``[start, end)``, without loading it whole.

        Lines end at ``\\n`` only (a trailing ``\\r`` is dropped unless ``keepends``), locally and on S3
        alike, so byte offsets counted with ``keepends=True`` address the same lines in both.
        ``version`` (from ``version()``) makes the read fail with InputError if the input has
        changed since then, instead of reading other lines than were planned.
        """
        if end is not None and end <= start:
            return
        if is_s3(uri):
            chunks = self._read_s3(uri, start=start, end=end, version=version)

            def read(size: int) -> bytes:
                try:
                    return next(chunks, b"")
                except Exception as exc:  # botocore raises ClientError / EndpointConnectionError
                    if s3_error_code(exc) in {"PreconditionFailed", "412"}:
                        what = "after it was split into shards" if version is not None else "while it was read"
                        raise InputError(f"{uri} changed {what}; run the DAG again") from None
                    raise self._s3_error(uri, exc) from exc

            with contextlib.closing(chunks):
                yield from _split_lines(read, keepends)
            return
        try:
            handle = open(uri, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise InputError(f"cannot read {uri}: {exc.strerror or exc}") from exc
        with handle:
            if version is not None and _local_version(os.fstat(handle.fileno())) != version:
                raise InputError(f"{uri} changed after it was split into shards; run the DAG again")
            handle.seek(start)
            remaining = None if end is None else end - start

            def read(size: int) -> bytes:
                nonlocal remaining
                if remaining is None:
                    return handle.read(size)
                chunk = handle.read(min(size, remaining))
                remaining -= len(chunk)
                return chunk

            yield from _split_lines(read, keepends)

    def read_bytes(self, uri: str) -> bytes:
        """Read a whole (small) file or object, such as one image.

        S3's definite answers become the local errors: FileNotFoundError for a missing object,
        PermissionError for any other (AccessDenied ...). A store fault (no answer, a cut-off body, 5xx,
        throttling) is attempted again, resuming a cut-off body; one that persists is a StorageError,
        the job's failure, never the object's. A malformed ``s3://`` URI is a ValueError.
        """
        if not is_s3(uri):
            return Path(uri).read_bytes()
        split_s3(uri)
        try:
            return b"".join(self._read_s3(uri))
        except Exception as exc:  # botocore raises ClientError, EndpointConnectionError, ...
            raise self._as_local_error(uri, exc) from exc

    def download(self, uri: str, handle: IO[bytes]) -> None:
        """Copy an ``s3://`` object into ``handle`` in parts (never whole in memory); errors as ``read_bytes``'s."""
        split_s3(uri)
        try:
            for chunk in self._read_s3(uri):
                handle.write(chunk)
        except Exception as exc:  # botocore raises ClientError, EndpointConnectionError, ...
            raise self._as_local_error(uri, exc) from exc

    def _as_local_error(self, uri: str, exc: Exception) -> Exception:
        """S3's definite answer about one object as the local error: FileNotFoundError if it is missing, PermissionError
        for any other (AccessDenied ...); a store fault that outlasted every attempt is a StorageError."""
        if not definite(exc):
            return self._fault(uri, exc)
        code = s3_error_code(exc)
        if code in MISSING_S3_CODES:
            return FileNotFoundError(errno.ENOENT, code, uri)
        return PermissionError(errno.EACCES, code, uri)

    def exists(self, uri: str) -> bool:
        """True if the file or object exists."""
        return self.version(uri) is not None

    def version(self, uri: str) -> ObjectVersion | None:
        """The object's current version (S3 ETag or local mtime/size/inode) and recorded sha256, or None if absent."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                head = self.s3.head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                if s3_error_code(exc) in MISSING_S3_CODES:
                    return None
                raise StorageError(f"cannot stat {uri}: {s3_error_code(exc) or type(exc).__name__}") from exc
            return ObjectVersion(token=head["ETag"], sha256=(head.get("Metadata") or {}).get(SHA256_METADATA))
        try:
            stat = os.stat(uri)
        except FileNotFoundError:
            return None
        return ObjectVersion(token=_local_version(stat), sha256=None)

    def delete(self, uri: str) -> None:
        """Remove a file or object (gone already is fine)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:
                raise StorageError(f"cannot delete {uri}: {s3_error_code(exc) or type(exc).__name__}") from exc
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uri)

    def list(self, prefix: str) -> list[str]:
        """The URIs of the objects directly under ``prefix`` (a folder or an ``s3://`` prefix ending in /), sorted."""
        if is_s3(prefix):
            bucket, key = split_s3(prefix)
            try:
                pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
                return sorted(f"s3://{bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", []))
            except Exception as exc:
                raise StorageError(f"cannot list {prefix}: {s3_error_code(exc) or type(exc).__name__}") from exc
        folder = Path(prefix)
        if not folder.is_dir():
            return []
        return sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def url(self, uri: str, *, expires_s: int) -> str:
        """A URL a browser can open: presigned GET for S3, valid ``expires_s`` (SigV4 allows at most 7 days), ``file://`` for a local path."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self.s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)
        return Path(uri).resolve().as_uri()

    @contextlib.contextmanager
    def open_atomic(self, uri: str, *, exclusive: bool = False, content_type: str | None = None) -> Iterator[IO[bytes]]:
        """Yield a binary file whose content appears at ``uri`` only if the block completes.

        The bytes are spooled (locally: a temporary file in the target's folder), then published in
        one step: ``os.replace``, or one S3 PutObject (multipart above ``S3_PUT_LIMIT``), which S3
        exposes only once complete. No reader ever sees a partial object, even after kill -9.

        If the target already holds exactly these bytes, nothing is written, so a rerun is a no-op.
        Otherwise the write is conditional on the target being unchanged since the block began
        (S3: ``If-Match`` the ETag read then, or ``If-None-Match: *`` if there was none); with
        ``exclusive`` it must not exist at all. A writer that raced another gets a StorageError
        instead of silently replacing the other's output.
        """
        before = self.version(uri)
        if exclusive and before is not None:
            raise StorageError(f"cannot write {uri}: it already exists")
        if is_s3(uri):
            with tempfile.TemporaryFile(prefix="vqa-upload-") as spool:
                yield spool
                self._publish_s3(uri, spool, before, {"ContentType": content_type} if content_type else {})
            return
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            self._publish_local(target, tmp, before, exclusive=exclusive)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _publish_local(self, target: Path, tmp: str, before: ObjectVersion | None, *, exclusive: bool) -> None:
        now = self.version(str(target))
        if now is not None and now == before and not exclusive:
            with open(target, "rb") as current, open(tmp, "rb") as new:
                if _sha256(current) == _sha256(new):
                    return  # already holds these bytes
        if now != before:
            raise StorageError(f"cannot write {target}: {_RACED}")
        if before is None:
            try:
                os.link(tmp, target)  # atomic create-if-absent
            except FileExistsError:
                raise StorageError(f"cannot write {target}: {_RACED}") from None
        else:
            os.replace(tmp, target)

    def _publish_s3(self, uri: str, spool: IO[bytes], before: ObjectVersion | None, headers: dict[str, str]) -> None:
        bucket, key = split_s3(uri)
        spool.flush()
        digest = _sha256(spool)
        size = spool.tell()
        if before is not None and before.sha256 == digest:
            now = self.version(uri)
            if now is not None and now.token == before.token:
                return  # already holds these bytes
        condition = {"IfMatch": before.token} if before is not None else {"IfNoneMatch": "*"}
        spool.seek(0)
        try:
            if size <= S3_PUT_LIMIT:
                self.s3.put_object(Bucket=bucket, Key=key, Body=spool, Metadata={SHA256_METADATA: digest}, **headers, **condition)
            else:
                self._multipart_s3(bucket, key, spool, digest, condition, headers)
        except Exception as exc:  # botocore raises ClientError, EndpointConnectionError
            code = s3_error_code(exc)
            if code in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
                # an attempt whose answer was lost may have written these very bytes, and the next attempt's
                # condition then fails against them: that is this write done, not a race
                landed = self.version(uri)
                if landed is not None and landed.sha256 == digest:
                    return
                raise StorageError(f"cannot write {uri}: {_RACED} ({code})") from None
            raise StorageError(f"cannot write {uri}: {code or type(exc).__name__}") from exc

    def _multipart_s3(
        self, bucket: str, key: str, spool: IO[bytes], digest: str, condition: dict[str, str], headers: dict[str, str]
    ) -> None:
        upload = self.s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata={SHA256_METADATA: digest}, **headers)[
            "UploadId"
        ]
        try:
            parts: list[dict[str, Any]] = []
            while chunk := spool.read(S3_PART_SIZE):
                number = len(parts) + 1
                etag = self.s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=chunk)["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
            self.s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}, **condition
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
            raise


_RACED = "another writer changed it while this one ran (is another try of this task still running?)"


def _local_version(stat: os.stat_result) -> str:
    return f"{stat.st_mtime_ns}:{stat.st_size}:{stat.st_ino}"


def _split_lines(read: Callable[[int], bytes], keepends: bool) -> Iterator[bytes]:
    """The ``\\n``-terminated lines of a stream read in 64 KiB chunks (the last may lack its newline)."""
    buffer = bytearray()
    scanned = 0
    while chunk := read(1 << 16):
        buffer += chunk
        begin = 0
        while (newline := buffer.find(b"\n", max(begin, scanned))) >= 0:
            line = bytes(buffer[begin : newline + 1])
            yield line if keepends else line.rstrip(b"\r\n")
            begin = newline + 1
        del buffer[:begin]
        scanned = len(buffer)
    if buffer:
        yield bytes(buffer) if keepends else bytes(buffer).rstrip(b"\r")


def _sha256(handle: IO[bytes]) -> str:
    """The sha256 of a file's whole content; leaves the position at the end."""
    handle.seek(0)
    return hashlib.file_digest(handle, "sha256").hexdigest()  # type: ignore[arg-type]  # any binary file object will do
