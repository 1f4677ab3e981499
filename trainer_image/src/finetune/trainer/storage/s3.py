"""An `s3://` prefix (AWS or any S3-compatible store) as a `Store`.

The one S3 client is made here (`S3Settings.client`), from the spec's output settings
(an endpoint URL for MinIO and other S3-compatible stores); credentials come from
boto3's standard chain: environment variables (the operator mounts them from
`output.credentialsSecretRef`), a web identity on EKS, or instance metadata. Every
request goes through `S3Store.call`: botocore's few quick tries, then the retry policy
(`retries`) for what is transient, and S3's permanent refusals (403, a missing
bucket...) raised at once as errors naming the URI. Streaming reads that break off are
reopened at the byte they reached (`ResumableRead`).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple, TypeVar

from finetune.trainer.errors import AccessDenied, JobInputError
from finetune.trainer.storage.files import written_whole
from finetune.trainer.storage.retries import with_retries

if TYPE_CHECKING:
    from finetune.api.outputs import OutputSpec

T = TypeVar("T")

# S3 answers that retrying cannot change.
PERMANENT_S3_ERRORS = frozenset(
    {
        "AccessDenied",
        "403",
        "404",
        "NoSuchBucket",
        "NoSuchKey",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "InvalidBucketName",
    }
)
# The permanent refusals that are about the credentials, not the URI.
CREDENTIAL_S3_ERRORS = frozenset(
    {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
)
# botocore's own quick tries per request; `with_retries` rides out longer outages with a
# bounded backoff, so transfers resume soon after the store answers again.
CLIENT_ATTEMPTS = 3
# Multipart in 8 MiB parts (s3transfer grows them for files past 10,000 parts), 16 in
# flight: measured on loopback, bigger parts were slower (fewer parallel requests), and
# 16 streams fill a GPU node's network where boto3's default 10 leave room.
MULTIPART_BYTES = 8 * 1024 * 1024
TRANSFER_THREADS = 16


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        rest = uri.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        return cls(bucket, prefix)

    @property
    def folder(self) -> str:
        """The key prefix of this folder-like URI, ending in `/` unless empty."""
        prefix = self.prefix
        return prefix if not prefix or prefix.endswith("/") else prefix + "/"


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def of(cls, output: OutputSpec) -> S3Settings:
        """The settings a job's spec gives for every S3 URI it names."""
        return cls(output.s3_endpoint_url, output.s3_region)

    def client(self, patience: float | None = None) -> Any:
        """A boto3 S3 client (safe to share between threads); with `patience`, one for a
        call that may fail: a single try that waits at most that many seconds to connect
        and for each read."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import PartialCredentialsError, ProfileNotFound

        if patience is None:
            config = Config(retries={"max_attempts": CLIENT_ATTEMPTS, "mode": "adaptive"})
        else:
            config = Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=patience,
                read_timeout=patience,
            )
        try:
            return boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )
        except (PartialCredentialsError, ProfileNotFound) as exc:
            # Credentials that cannot be complete: the same refusal as S3's own.
            raise AccessDenied(f"S3 credentials: {exc} ({credentials_advice()})") from exc


@contextmanager
def refusals_named(uri: str) -> Iterator[None]:
    """Turn S3's permanent refusals into a `JobInputError` naming `uri` (an
    `AccessDenied` when it is the credentials S3 refuses); throttling and server
    errors pass through, since a retry may succeed."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        _raise_refusal(uri, code, exc)
        raise
    except S3UploadFailedError as exc:  # boto3 keeps only the ClientError's text
        _raise_refusal(uri, upload_refusal(exc) or "", exc)
        raise
    except NoCredentialsError as exc:
        raise AccessDenied(f"{uri}: no S3 credentials ({credentials_advice()})") from exc


def _raise_refusal(uri: str, code: str, exc: Exception) -> None:
    if code in CREDENTIAL_S3_ERRORS:
        raise AccessDenied(f"{uri}: S3 refused the request ({code})") from exc
    if code in PERMANENT_S3_ERRORS:
        raise JobInputError(f"{uri}: S3 refused the request ({code})") from exc


def upload_refusal(exc: BaseException) -> str | None:
    """The permanent S3 error code in a failed upload's message, if any."""
    found = re.search(r"\(([A-Za-z0-9]+)\) when calling", str(exc))
    code = found.group(1) if found else None
    return code if code in PERMANENT_S3_ERRORS else None


def credentials_advice() -> str:
    """Where S3 credentials come from, said for where this process runs."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "set spec.output.credentialsSecretRef to a Secret with the keys"
    return "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials"


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
    if isinstance(exc, S3UploadFailedError):
        return upload_refusal(exc) is None
    return isinstance(exc, ConnectionError | TimeoutError)


def _broken_read(exc: BaseException) -> bool:
    """A streamed body that broke off (or could not be reopened) for a reason a later
    try may not meet: worth reopening at the byte reached."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return transient(exc) or isinstance(exc, BotoCoreError | HTTPError | OSError)


class S3Object(NamedTuple):
    key: str  # relative to the store's prefix
    size: int
    etag: str  # the MD5 of the bytes for a single-part upload without KMS


def not_found(exc: BaseException | None) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in {
        "NoSuchKey",
        "404",
    }


class S3Store:
    def __init__(self, uri: str, settings: S3Settings) -> None:
        from boto3.s3.transfer import TransferConfig

        self.uri = uri.rstrip("/")
        location = S3Location.parse(uri)
        self.bucket = location.bucket
        self.prefix = location.folder
        self.client = settings.client()
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=MULTIPART_BYTES,
            max_concurrency=TRANSFER_THREADS,
            use_threads=True,
        )

    def uri_of(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def call(self, key: str, call: Callable[[], T]) -> T:
        """`call()` (a request about `key`) with the retry policy; S3's refusals named."""
        uri = self.uri_of(key)
        with refusals_named(uri):
            return with_retries(uri, call, transient)

    def objects(self, prefix: str = "") -> list[S3Object]:
        """Every object under `prefix`, folders' placeholder keys left out: the one listing."""

        def everything() -> list[S3Object]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            return [
                S3Object(
                    item["Key"][len(self.prefix) :],
                    int(item["Size"]),
                    str(item["ETag"]).strip('"'),
                )
                for page in pages
                for item in page.get("Contents", [])
                if not item["Key"].endswith("/")
            ]

        return self.call(prefix, everything)

    def top_level(self) -> list[str]:
        """The names right under the prefix, as a folder lists them: its objects' and its
        sub-prefixes' (one listing by delimiter, however many objects they hold)."""

        def names() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            )
            found = set()
            for page in pages:
                found |= {
                    p["Prefix"][len(self.prefix) :].rstrip("/")
                    for p in page.get("CommonPrefixes", [])
                }
                found |= {item["Key"][len(self.prefix) :] for item in page.get("Contents", [])}
            return sorted(found - {""})

        return self.call("", names)

    def keys(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        yield from ((item.key, item.size) for item in self.objects(prefix))

    def put_file(self, path: Path, key: str) -> None:
        self.call(
            key,
            lambda: self.client.upload_file(
                str(path), self.bucket, self.prefix + key, Config=self.transfer
            ),
        )

    def download(self, key: str, path: Path) -> None:
        """The object's bytes into `path` as they arrive (see `get_file`)."""
        self.call(
            key,
            lambda: self.client.download_file(
                self.bucket, self.prefix + key, str(path), Config=self.transfer
            ),
        )

    def get_file(self, key: str, path: Path) -> None:
        with written_whole(path) as partial:
            self.download(key, partial)

    def encrypted(self, key: str) -> bool:
        """Objects encrypted with KMS or a customer key have ETags that are not the MD5."""
        head = self.call(
            key, lambda: self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        )
        return head.get("ServerSideEncryption") == "aws:kms" or "SSECustomerAlgorithm" in head

    def get_object(self, key: str, **extra: Any) -> dict[str, Any]:
        """The object's metadata and streamed body (one try, S3's errors as they are)."""
        return dict(self.client.get_object(Bucket=self.bucket, Key=self.prefix + key, **extra))

    def body(self, key: str, offset: int = 0) -> Any:
        """The object's streamed body from byte `offset` on (one try: see `ResumableRead`)."""
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        with refusals_named(self.uri_of(key)):
            return self.get_object(key, **extra)["Body"]

    def open(self, key: str) -> IO[bytes]:
        return ResumableRead(self, key)  # type: ignore[return-value]

    def read_text(self, key: str) -> str | None:
        def get() -> str | None:
            try:
                return str(self.get_object(key)["Body"].read().decode())
            except Exception as exc:
                if not_found(exc):
                    return None
                raise

        return self.call(key, get)

    def write_text(self, key: str, text: str) -> None:
        self.call(
            key,
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=text.encode()
            ),
        )

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the API's limit per request
            batch = keys[start : start + 1000]
            self.call(batch[0], lambda batch=batch: self._delete_batch(batch))  # type: ignore[misc]

    def _delete_batch(self, keys: list[str]) -> None:
        """One DeleteObjects request. S3 answers 200 even where it refused a key (no
        DeleteObject right, say), listing those under `Errors`: the first is raised as
        the error it is, so a refusal is named and a passing fault retried."""
        from botocore.exceptions import ClientError

        objects = [{"Key": self.prefix + key} for key in keys]
        answer = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
        )
        for error in answer.get("Errors", [])[:1]:
            key = str(error.get("Key", ""))[len(self.prefix) :]
            with refusals_named(self.uri_of(key)):
                raise ClientError(
                    {"Error": {"Code": error.get("Code", ""), "Message": error.get("Message", "")}},
                    "DeleteObjects",
                )


class ResumableRead(io.RawIOBase):
    """An S3 object read front to back; a connection that breaks off mid-way is reopened
    at the byte where it stopped (with the retry policy's backoff), so a long shard
    survives a network blip."""

    def __init__(self, store: S3Store, key: str) -> None:
        self.store = store
        self.key = key
        self.offset = 0
        self.body: Any = None
        self.tries = 0

    def readable(self) -> bool:
        return True

    def _read_once(self, size: int) -> bytes:
        self.tries += 1
        try:
            if self.body is None:
                self.body = self.store.body(self.key, self.offset)
            data: bytes = self.body.read(None if size < 0 else size)
        except Exception:
            self.body = None  # reopened at `offset` on the next try
            raise
        self.offset += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        uri = self.store.uri_of(self.key)
        self.tries = 0
        try:
            return with_retries(
                f"{uri} at byte {self.offset}", lambda: self._read_once(size), _broken_read
            )
        except Exception as exc:
            if not _broken_read(exc):
                raise
            raise OSError(
                f"{uri}: reading failed {self.tries} times at byte {self.offset} ({exc})"
            ) from exc

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None
        super().close()
