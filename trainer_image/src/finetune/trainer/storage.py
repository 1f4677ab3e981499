"""Reading inputs from S3 (or any S3-compatible store) into a local cache.

Credentials come from boto3's standard chain: environment variables (the
operator mounts them from `output.credentialsSecretRef`), a web identity on
EKS, or instance metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import JobInputError


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
    from botocore.exceptions import BotoCoreError, ClientError

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
        code = exc.response.get("Error", {}).get("Code", "")
        raise JobInputError(f"{uri}: S3 refused the request ({code}): {exc}") from exc
    except BotoCoreError as exc:
        raise JobInputError(f"{uri}: cannot reach S3: {exc}") from exc
    if found == 0:
        raise JobInputError(f"{uri}: no objects under this S3 prefix")
    return destination


def upload_folder(folder: Path, uri: str, settings: S3Settings) -> None:
    """Upload every file under `folder` to the S3 prefix `uri`."""
    location = S3Location.parse(uri)
    prefix = location.prefix.rstrip("/")
    client = settings.client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = (
            f"{prefix}/{path.relative_to(folder).as_posix()}"
            if prefix
            else path.relative_to(folder).as_posix()
        )
        client.upload_file(str(path), location.bucket, key)
