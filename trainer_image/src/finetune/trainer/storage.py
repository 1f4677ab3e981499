"""Reading inputs from S3 (or any S3-compatible store) into a local cache.

Credentials come from boto3's standard chain: environment variables (the
operator mounts them from `output.credentialsSecretRef`), a web identity on
EKS, or instance metadata.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AccessDenied, JobInputError

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

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 8, "mode": "adaptive"})
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
        raise AccessDenied(f"{uri}: no S3 credentials (set output.credentialsSecretRef)") from exc


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


def download_prefix(uri: str, destination: Path, settings: S3Settings) -> Path:
    """Mirror every object under `uri` into `destination`; files already there with
    the same size are kept, so a restarted job does not download them again."""
    location = S3Location.parse(uri)
    prefix = prefix_of(location)
    client = settings.client()
    found = 0
    with refusals_named(uri):
        for key, size in list_keys(client, location.bucket, prefix):
            relative = key[len(prefix) :]
            if not relative:
                continue
            found += 1
            target = destination / relative
            if target.exists() and target.stat().st_size == size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            client.download_file(location.bucket, key, str(partial))
            partial.replace(target)
    if found == 0:
        raise JobInputError(f"{uri}: no objects under this S3 prefix")
    return destination


def upload_results(folder: Path, uri: str, settings: S3Settings) -> None:
    """Upload a finished run's results to the S3 prefix `uri`, the model card last so a
    prefix with a README.md is complete. Checkpoints and working files stay behind."""
    location = S3Location.parse(uri)
    prefix = location.prefix.rstrip("/")
    client = settings.client()
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] not in NOT_RESULTS
    ]
    for path in sorted(files, key=lambda p: (p == folder / "README.md", str(p))):
        key = (
            f"{prefix}/{path.relative_to(folder).as_posix()}"
            if prefix
            else path.relative_to(folder).as_posix()
        )
        client.upload_file(str(path), location.bucket, key)
