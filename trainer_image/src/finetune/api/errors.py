"""Turn validation failures into one line per problem, each naming its field."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .common import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, QUANTITY_PATTERN
from .job import NAME_PATTERN
from .rules import RULE_ERROR_TYPE

# What the regular expressions of the API mean, in words a user can act on.
_PATTERN_MEANINGS = {
    NAME_PATTERN: "lower-case letters, digits and '-', starting with a letter",
    DNS_LABEL_PATTERN: "lower-case letters, digits and '-' (an RFC 1123 label)",
    DNS_SUBDOMAIN_PATTERN: "lower-case letters, digits, '-' and '.' (an RFC 1123 subdomain)",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 8, 500m or 32Gi",
}


@dataclass(frozen=True)
class FieldProblem:
    path: str  # e.g. "spec.training.learningRate" or "spec.data.concepts[0].instancePrompt"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def format_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _join(base: str, relative: str) -> str:
    if not base:
        return relative
    return f"{base}{relative}" if relative.startswith("[") else f"{base}.{relative}"


def _message(error: ErrorDetails) -> str:
    message = _plain_message(error)
    given = error.get("input")
    if isinstance(given, bool) and error["type"] in ("enum", "literal_error", "string_type"):
        # YAML 1.1 reads unquoted no/off/yes/on as booleans: `mixedPrecision: no`.
        word = "false (an unquoted no or off)" if not given else "true (an unquoted yes or on)"
        message += f'; YAML read {word}: quote the word, as in "no"'
    elif isinstance(given, str) and error["type"] in ("int_type", "float_type", "bool_type"):
        # Kubernetes refuses a quoted number or boolean; so do we, saying why.
        message += f"; got the text {given!r}: write it without quotes"
    return message


def _plain_message(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"{error['msg'].replace('Input should be', 'must be')}, got {error.get('input')!r}"
    if kind == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern", "")
        if pattern in _PATTERN_MEANINGS:
            return f"{error.get('input')!r} is not {_PATTERN_MEANINGS[pattern]}"
        return f"{error.get('input')!r} does not match the pattern {pattern}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return message.replace("Input should be", "must be")


def problems_from(error: ValidationError) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    for detail in error.errors():
        base = format_path(detail["loc"])
        if detail["type"] == RULE_ERROR_TYPE:
            ctx: dict[str, Any] = detail.get("ctx") or {}
            for rule in ctx.get("problems", []):
                problems.append(FieldProblem(_join(base, rule["path"]), rule["message"]))
        else:
            problems.append(FieldProblem(base, _message(detail)))
    return problems


def render(problems: Iterable[FieldProblem], source: str = "") -> list[str]:
    prefix = f"{source}: " if source else ""
    return [f"{prefix}{p}" for p in problems]
