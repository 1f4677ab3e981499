"""Building blocks shared by every part of the FineTuneJob API."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

# The URI schemes a job may name. Anything else (gs://, http://) is refused at
# validation time rather than failing deep inside the trainer.
HF_SCHEME = "hf://"
S3_SCHEME = "s3://"
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HF_RE = re.compile(r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_S3_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")

# Kubernetes resource quantities ("8", "500m", "32Gi", "1.5").
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# RFC 1123 label, as Kubernetes requires for most object names.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Secret names are RFC 1123 subdomains.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

MAX_URI_LENGTH = 2048
MAX_PROMPT_LENGTH = 1024


class ApiModel(BaseModel):
    """camelCase in YAML, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        # JSON (and so the API server) has no Infinity or NaN: YAML's `.inf` is refused.
        allow_inf_nan=False,
    )


def _check_uri(value: str) -> str:
    if value.startswith(HF_SCHEME):
        if not _HF_RE.match(value):
            raise ValueError(f"{value!r} is not of the form hf://org/name[@revision]")
    elif value.startswith(S3_SCHEME):
        if not _S3_RE.match(value):
            raise ValueError(f"{value!r} is not of the form s3://bucket[/prefix]")
    elif _SCHEME_RE.match(value):
        scheme = value.split("://", 1)[0]
        raise ValueError(
            f"unsupported scheme {scheme}:// in {value!r}; use hf://, s3:// or a local path"
        )
    return value


Uri = Annotated[
    str,
    Field(min_length=1, max_length=MAX_URI_LENGTH),
    AfterValidator(_check_uri),
]
"""`hf://org/name[@revision]`, `s3://bucket/prefix` or a local path."""


def check_storage_uri(value: str) -> str:
    """`value` if it names storage (`s3://` or a local path); ValueError otherwise."""
    if value.startswith(HF_SCHEME):
        raise ValueError(
            f"{value!r}: hf:// names a model on the Hugging Face Hub; this field takes "
            "s3://bucket/prefix or a local path"
        )
    if _SCHEME_RE.match(value) and not value.startswith(S3_SCHEME):
        scheme = value.split("://", 1)[0]
        raise ValueError(f"unsupported scheme {scheme}:// in {value!r}; use s3:// or a local path")
    return _check_uri(value)


StorageUri = Annotated[
    str,
    Field(min_length=1, max_length=MAX_URI_LENGTH),
    AfterValidator(check_storage_uri),
]
"""`s3://bucket/prefix` or a local path: images, datasets and outputs (models alone come
from the hub)."""


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Prompt = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_LENGTH), AfterValidator(_not_blank)
]


def _quantity_text(value: object) -> object:
    # Kubernetes quantities are int-or-string: `cpu: 8` is as good as `cpu: "8"`.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_text),
    Field(pattern=QUANTITY_PATTERN, max_length=64),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "minimum": 0,
            "pattern": QUANTITY_PATTERN,
            "maxLength": 64,
        }
    ),
]
"""A Kubernetes quantity ("8", 8, "500m", "32Gi"), kept as its string form."""


class SecretKeyRef(ApiModel):
    """One key of a Secret in the job's namespace."""

    name: str = Field(
        pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Name of the Secret."
    )
    key: str = Field(
        default="token",
        min_length=1,
        max_length=253,
        description="Key inside the Secret whose value is used.",
    )


class SecretRef(ApiModel):
    """A whole Secret whose keys become environment variables of the trainer."""

    name: str = Field(
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description=(
            "Name of the Secret. Its keys (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "optionally AWS_SESSION_TOKEN) are exposed to the trainer as environment variables."
        ),
    )


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def is_hub(uri: str) -> bool:
    return uri.startswith(HF_SCHEME)
