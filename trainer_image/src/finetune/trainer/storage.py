"""Reading inputs from S3 (or any S3-compatible store) into a local cache.

Credentials come from boto3's standard chain: environment variables (the
operator mounts them from `output.credentialsSecretRef`), a web identity on
EKS, or instance metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import JobInputError

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


def download_prefix(uri: str, destination: Path, settings: S3Settings) -> Path:
    """Mirror every object under `uri` into `destination`; files already there with
    the same size are kept, so a restarted job does not download them again."""
    from botocore.exceptions import ClientError, NoCredentialsError

    location = S3Location.parse(uri)
    prefix = (
        location.prefix
        if not location.prefix or location.prefix.endswith("/")
        else location.prefix + "/"
    )
    client = settings.client()
    found = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=prefix
        ):
            for item in page.get("Contents", []):
                key = item["Key"]
                relative = key[len(prefix) :]
                if not relative or relative.endswith("/"):
                    continue
                found += 1
                target = destination / relative
                if target.exists() and target.stat().st_size == item["Size"]:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                client.download_file(location.bucket, key, str(partial))
                partial.replace(target)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in PERMANENT_S3_ERRORS:
            raise JobInputError(f"{uri}: S3 refused the request ({code})") from exc
        raise  # throttling, 5xx: worth a retry
    except NoCredentialsError as exc:
        raise JobInputError(f"{uri}: no S3 credentials (set output.credentialsSecretRef)") from exc
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
