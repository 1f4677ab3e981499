"""One storage interface for an `s3://` prefix and a local folder.

The trainer and the tools put and get whole files, list what is under a path,
read and write small texts and delete; keys are relative, `/`-separated paths.
S3 goes through boto3 (an endpoint URL for MinIO and other S3-compatible stores,
credentials from boto3's standard chain) with tuned multipart transfers, botocore's
own retries, and an outer retry loop with exponential backoff and jitter that
rides out a longer outage. Permanent refusals (403, a missing bucket...) are raised
at once, never retried. The loop's waits end at once on a stop request
(`stopping.pause` raises `Stopped`), so Ctrl-C is never stuck behind an outage.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

from finetune.trainer.errors import AccessDenied, JobInputError
from finetune.trainer.process import stopping
from finetune.trainer.storage.s3 import (
    CREDENTIAL_S3_ERRORS,
    PERMANENT_S3_ERRORS,
    S3Location,
    S3Settings,
    prefix_of,
    refusals_named,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Multipart in 8 MiB parts (s3transfer grows them for files past 10,000 parts), 16 in
# flight: measured on loopback, bigger parts were slower (fewer parallel requests), and
# 16 streams fill a GPU node's network where boto3's default 10 leave room.
MULTIPART_BYTES = 8 * 1024 * 1024
TRANSFER_THREADS = 16
# How long the outer loop keeps retrying a transient failure (an outage), at most.
RETRY_FOR_ENV = "FINETUNE_S3_RETRY_SECONDS"
DEFAULT_RETRY_FOR = 3600.0
MAX_BACKOFF = 10.0


class Store(Protocol):
    uri: str

    def put_file(self, path: Path, key: str) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def keys(self, prefix: str = "") -> Iterator[tuple[str, int]]: ...
    def read_text(self, key: str) -> str | None: ...
    def write_text(self, key: str, text: str) -> None: ...
    def delete(self, keys: list[str]) -> None: ...


def open_store(uri: str, settings: S3Settings | None = None) -> Store:
    if uri.startswith("s3://"):
        return S3Store(uri, settings or S3Settings())
    return LocalStore(Path(uri))


def transient(exc: BaseException) -> bool:
    """True for what a later try may not meet again: connection errors, 5xx, throttling."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(
        exc,
        EndpointConnectionError | ConnectionClosedError | ReadTimeoutError | ConnectTimeoutError,
    ):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or error.get("Code") in {"SlowDown", "Throttling", "RequestTimeout"}
    if isinstance(exc, S3UploadFailedError):  # boto3 keeps only the ClientError's text
        return upload_refusal(exc) is None
    return isinstance(exc, ConnectionError | TimeoutError)


def upload_refusal(exc: BaseException) -> str | None:
    """The permanent S3 error code in a failed upload's message, if any."""
    found = re.search(r"\(([A-Za-z0-9]+)\) when calling", str(exc))
    code = found.group(1) if found else None
    return code if code in PERMANENT_S3_ERRORS else None


def retry_budget() -> float:
    """Seconds a transient failure is retried (`$FINETUNE_S3_RETRY_SECONDS`, also for the hub)."""
    return float(os.environ.get(RETRY_FOR_ENV, DEFAULT_RETRY_FOR))


def with_retries(
    what: str,
    call: Callable[[], T],
    retry_for: float | None = None,
    is_transient: Callable[[BaseException], bool] = transient,
) -> T:
    """`call()`, tried again with exponential backoff and full jitter while it fails
    transiently, for at most `retry_for` seconds; anything else is raised at once."""
    budget = retry_for if retry_for is not None else retry_budget()
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() >= deadline:
                raise
            delay = random.uniform(0, min(MAX_BACKOFF, 0.5 * 2**attempt))
            delay = min(delay, max(0.0, deadline - time.monotonic()))  # no wait past the budget
            attempt += 1
            log.warning("%s: %s; trying again in %.1f s (try %d)", what, exc, delay, attempt)
            stopping.pause(delay)


class S3Store:
    def __init__(self, uri: str, settings: S3Settings) -> None:
        from boto3.s3.transfer import TransferConfig

        self.uri = uri.rstrip("/")
        location = S3Location.parse(uri)
        self.bucket = location.bucket
        self.prefix = prefix_of(location)
        # Few quick tries inside botocore; `with_retries` rides out longer outages with
        # a bounded backoff, so uploads resume soon after the store answers again.
        self.client = settings.client(attempts=3)
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=MULTIPART_BYTES,
            max_concurrency=TRANSFER_THREADS,
            use_threads=True,
        )

    def _call(self, key: str, call: Callable[[], T]) -> T:
        from boto3.exceptions import S3UploadFailedError

        uri = f"{self.uri}/{key}"
        with refusals_named(uri):
            try:
                return with_retries(uri, call)
            except S3UploadFailedError as exc:
                code = upload_refusal(exc)
                if code is None:
                    raise
                error = AccessDenied if code in CREDENTIAL_S3_ERRORS else JobInputError
                raise error(f"{uri}: S3 refused the request ({code})") from exc

    def put_file(self, path: Path, key: str) -> None:
        self._call(
            key,
            lambda: self.client.upload_file(
                str(path), self.bucket, self.prefix + key, Config=self.transfer
            ),
        )

    def get_file(self, key: str, path: Path) -> None:
        """Download through a `.partial` file, renamed once complete."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        self._call(
            key,
            lambda: self.client.download_file(
                self.bucket, self.prefix + key, str(partial), Config=self.transfer
            ),
        )
        partial.replace(path)

    def keys(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        def everything() -> list[tuple[str, int]]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            return [
                (item["Key"][len(self.prefix) :], int(item["Size"]))
                for page in pages
                for item in page.get("Contents", [])
                if not item["Key"].endswith("/")
            ]

        yield from self._call(prefix, everything)

    def read_text(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        def get() -> str | None:
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
                return str(body.read().decode())
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    return None
                raise

        return self._call(key, get)

    def write_text(self, key: str, text: str) -> None:
        self._call(
            key,
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=text.encode()
            ),
        )

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the API's limit per request
            batch = [{"Key": self.prefix + k} for k in keys[start : start + 1000]]
            self._call(
                keys[start],
                lambda batch=batch: self.client.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )


def _copy_whole(source: Path, target: Path) -> None:
    """Copy through a `.partial` file renamed once complete; a file onto itself is a no-op."""
    if target.resolve() == source.resolve():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


class LocalStore:
    """A folder; writes go through a `.partial` file renamed once complete."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def put_file(self, path: Path, key: str) -> None:
        _copy_whole(path, self.root / key)

    def get_file(self, key: str, path: Path) -> None:
        _copy_whole(self.root / key, path)

    def keys(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not key.endswith(".partial"):
                yield key, path.stat().st_size

    def read_text(self, key: str) -> str | None:
        try:
            return (self.root / key).read_text()
        except FileNotFoundError:
            return None

    def write_text(self, key: str, text: str) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text)
        partial.replace(target)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
