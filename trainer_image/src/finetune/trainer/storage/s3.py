"""Reading inputs from S3 (or any S3-compatible store) into a local cache.

Credentials come from boto3's standard chain: environment variables (the
operator mounts them from `output.credentialsSecretRef`), a web identity on
EKS, or instance metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.trainer.errors import AccessDenied, JobInputError
from finetune.trainer.process import stopping

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
# Local working state that is not part of a job's results.
NOT_RESULTS = ("checkpoints", ".run", ".staging")


def cache_key(uri: str) -> str:
    """A short, stable folder name for what `uri` names in the local cache."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        rest = uri.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        return cls(bucket, prefix)


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None

    def client(self, attempts: int = 8) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": attempts, "mode": "adaptive"})
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
        )


@contextmanager
def refusals_named(uri: str) -> Iterator[None]:
    """Turn S3's permanent refusals into a `JobInputError` naming `uri` (an
    `AccessDenied` when it is the credentials S3 refuses); throttling and server
    errors pass through, since a retry may succeed."""
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in CREDENTIAL_S3_ERRORS:
            raise AccessDenied(f"{uri}: S3 refused the request ({code})") from exc
        if code in PERMANENT_S3_ERRORS:
            raise JobInputError(f"{uri}: S3 refused the request ({code})") from exc
        raise
    except NoCredentialsError as exc:
        raise AccessDenied(f"{uri}: no S3 credentials ({credentials_advice()})") from exc


def credentials_advice() -> str:
    """Where S3 credentials come from, said for where this process runs."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "set spec.output.credentialsSecretRef to a Secret with the keys"
    return "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials"


def prefix_of(location: S3Location) -> str:
    """The key prefix of a folder-like S3 URI, ending in `/` unless empty."""
    prefix = location.prefix
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def list_keys(client: Any, bucket: str, prefix: str) -> Iterator[tuple[str, int]]:
    """(key, size) of every object under `prefix`, folders' placeholder keys left out."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                yield item["Key"], int(item["Size"])


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in blocks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def intact(path: Path, size: int, etag: str) -> bool:
    """`path` holds the object: same size and, where the ETag is the MD5 of the bytes
    (a single-part upload), the same MD5. A multipart ETag is checked by size."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    return "-" in etag or len(etag) != 32 or file_digest(path, "md5") == etag


def _etag_is_no_md5(client: Any, location: S3Location, key: str) -> bool:
    """Objects encrypted with KMS or a customer key have ETags that are not the MD5."""
    head = client.head_object(Bucket=location.bucket, Key=key)
    return head.get("ServerSideEncryption") == "aws:kms" or "SSECustomerAlgorithm" in head


def download_prefix(uri: str, destination: Path, settings: S3Settings) -> Path:
    """Mirror every object under `uri` into `destination`, each checked against its size
    and ETag. A marker beside the folder records what was verified, so a restarted job
    reuses its cache without downloading (or hashing) anything again; an interrupted
    download leaves `.partial` files only and is simply resumed."""
    location = S3Location.parse(uri)
    prefix = prefix_of(location)
    client = settings.client()
    marker = destination.with_name(destination.name + ".verified.json")
    try:
        verified: dict[str, list[Any]] = json.loads(marker.read_text())
    except (OSError, ValueError):
        verified = {}
    now: dict[str, list[Any]] = {}
    with refusals_named(uri):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=prefix
        )
        for item in (item for page in pages for item in page.get("Contents", [])):
            key, size, etag = item["Key"], int(item["Size"]), str(item["ETag"]).strip('"')
            relative = key[len(prefix) :]
            if not relative or key.endswith("/"):
                continue
            now[relative] = [size, etag]
            target = destination / relative
            known = verified.get(relative) == [size, etag] and target.is_file()
            if (known and target.stat().st_size == size) or intact(target, size, etag):
                continue
            stopping.raise_if_requested()  # between files: a stop leaves whole files only
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            client.download_file(location.bucket, key, str(partial))
            if not intact(partial, size, etag) and not _etag_is_no_md5(client, location, key):
                partial.unlink(missing_ok=True)
                raise JobInputError(
                    f"s3://{location.bucket}/{key}: the download does not match the object's "
                    "size and ETag; it changed while downloading, or the transfer was corrupted"
                )
            partial.replace(target)
    if not now:
        raise JobInputError(f"{uri}: no objects under this S3 prefix")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(now))
    return destination
