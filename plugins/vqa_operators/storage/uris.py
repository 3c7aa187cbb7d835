"""Read and atomically write local files and S3 objects addressed by one URI string.

S3 is reached with boto3, so the standard AWS environment variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_REGION`` ...) select the endpoint and credentials; an Airflow task
can instead hand in a client built from its connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from vqa_operators.exceptions import InputError, StorageError


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


def errors_uri_for(output_uri: str) -> str:
    """``.../name.jsonl`` -> ``.../name.errors.jsonl``: the default errors file beside an output."""
    stem = output_uri[: -len(".jsonl")] if output_uri.endswith(".jsonl") else output_uri
    return stem + ".errors.jsonl"


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (``NoSuchKey``, ``AccessDenied`` ...), else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


class Storage:
    """One way to read and write URIs; S3 access goes through a single (thread-safe) boto3 client."""

    def __init__(self, s3_client: Any | None = None) -> None:
        if s3_client is not None:
            self.__dict__["s3"] = s3_client

    @cached_property
    def s3(self) -> Any:
        """The boto3 S3 client, created on first use from the standard AWS environment."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5}))

    def _s3_error(self, uri: str, exc: Exception) -> InputError:
        code = s3_error_code(exc) or type(exc).__name__
        return InputError(f"cannot read {uri}: {code}")

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        """Stream the lines of a file or object (newlines stripped) without loading it whole."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
            except Exception as exc:  # botocore raises ClientError / EndpointConnectionError
                raise self._s3_error(uri, exc) from exc
            with contextlib.closing(body):
                yield from body.iter_lines(chunk_size=1 << 16, keepends=False)
            return
        try:
            handle = open(uri, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise InputError(f"cannot read {uri}: {exc.strerror or exc}") from exc
        with handle:
            for line in handle:
                yield line.rstrip(b"\r\n")

    def read_bytes(self, uri: str) -> bytes:
        """Read a whole (small) file or object, such as one image.

        S3 answers become the local errors: FileNotFoundError for a missing object, PermissionError
        for any other S3 error code (AccessDenied ...); an unreachable endpoint is a StorageError.
        A malformed ``s3://`` URI is a ValueError.
        """
        if not is_s3(uri):
            return Path(uri).read_bytes()
        bucket, key = split_s3(uri)
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore raises ClientError, EndpointConnectionError, ...
            code = s3_error_code(exc)
            if code in {"NoSuchKey", "NoSuchBucket", "404"}:
                raise FileNotFoundError(errno.ENOENT, code, uri) from None
            if code is not None:
                raise PermissionError(errno.EACCES, code, uri) from None
            raise StorageError(f"cannot read {uri}: {type(exc).__name__}") from exc

    def exists(self, uri: str) -> bool:
        """True if the file or object exists."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                if s3_error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
                    return False
                raise
            return True
        return os.path.exists(uri)

    @contextlib.contextmanager
    def open_atomic(self, uri: str) -> Iterator[IO[bytes]]:
        """Yield a binary file whose content appears at ``uri`` only if the block completes.

        Local: a temporary file in the same folder, fsynced, then ``os.replace``. S3: a local spool
        uploaded in one PutObject/multipart upload, which S3 exposes only once complete.
        """
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with tempfile.TemporaryFile(prefix="vqa-upload-") as spool:
                yield spool
                spool.flush()
                spool.seek(0)
                try:
                    self.s3.upload_fileobj(spool, bucket, key)
                except Exception as exc:  # boto3 raises ClientError, S3UploadFailedError, EndpointConnectionError
                    raise StorageError(f"cannot write {uri}: {s3_error_code(exc) or type(exc).__name__}") from exc
            return
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
