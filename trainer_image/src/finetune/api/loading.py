"""Read FineTuneJob files the way `kubectl apply -f` would, with precise errors."""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import FieldProblem, format_path, problems_from
from .job import FineTuneJob


@dataclass
class LoadResult:
    source: str
    jobs: list[FineTuneJob] = field(default_factory=list)
    problems: list[FieldProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that reads scalars as kubectl does and refuses a key given twice in
    one mapping, where PyYAML would silently keep the last value. Keys merged in with
    `<<` may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: SafeLoader reports it below
                continue
            if first is not None:
                raise DuplicateKeyError(key, first, key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_scalars_as_kubectl_does(loader: type[yaml.SafeLoader]) -> None:
    """PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string and `2026-01-01` a
    date; kubectl reads the first as a number and the second as a string. Everything
    else (`yes`/`no` as booleans included) already agrees."""
    resolvers = {
        first: [(tag, regexp) for tag, regexp in entries if tag != _TIMESTAMP_TAG]
        for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for first in "-+0123456789.":
        resolvers.setdefault(first, []).append((_FLOAT_TAG, _EXPONENT_FLOAT))
    loader.yaml_implicit_resolvers = resolvers


_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# Numbers with an exponent and no dot, which YAML 1.1 leaves as strings.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")
_read_scalars_as_kubectl_does(UniqueKeyLoader)


class DuplicateKeyError(yaml.MarkedYAMLError):
    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(
            problem=f"duplicate key {key!r} (first on line {first.line + 1})",
            problem_mark=again,
        )


class JobFileError(Exception):
    """A job file that cannot be used; `problems` says why, field by field."""

    def __init__(self, result: LoadResult) -> None:
        self.result = result
        lines = [f"{result.source}: {p}" for p in result.problems]
        super().__init__("\n".join(lines))


def load_text(text: str, source: str) -> LoadResult:
    """Validate every YAML document in `text`; empty documents are skipped."""
    result = LoadResult(source)
    try:
        documents = list(yaml.load_all(text, Loader=UniqueKeyLoader))
    except DuplicateKeyError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        result.problems.append(FieldProblem("", f"{where}{exc.problem}"))
        return result
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        result.problems.append(FieldProblem("", f"{where}YAML syntax error: {exc.problem}"))
        return result
    except yaml.YAMLError as exc:
        result.problems.append(FieldProblem("", f"YAML error: {exc}"))
        return result
    except RecursionError:
        result.problems.append(FieldProblem("", TOO_DEEP))
        return result

    documents = [d for d in documents if d is not None]
    if not documents:
        result.problems.append(FieldProblem("", "no FineTuneJob in the file"))
    several = len(documents) > 1
    for index, document in enumerate(documents):
        prefix = f"document {index + 1}: " if several else ""
        if not isinstance(document, dict):
            kind = type(document).__name__
            result.problems.append(FieldProblem("", f"{prefix}expected a mapping, got a {kind}"))
            continue
        result.jobs += _validate(document, prefix, result.problems)
    return result


def _validate(
    document: dict[str, Any], prefix: str, problems: list[FieldProblem]
) -> list[FineTuneJob]:
    try:
        # Strict, over JSON: a value the API server would refuse for its type
        # (`maxSteps: "4"`, `trainTextEncoder: "yes"`) is refused here too.
        text = json.dumps(_as_json(document))
        return [FineTuneJob.model_validate_json(text, strict=True)]
    except _NotJsonError as exc:
        problems.append(FieldProblem(f"{prefix}{exc.path}", str(exc)))
        return []
    except RecursionError:
        problems.append(FieldProblem(prefix.rstrip(": "), TOO_DEEP))
        return []
    except ValidationError as exc:
        problems += [
            FieldProblem(f"{prefix}{p.path}" if p.path else prefix.rstrip(": "), p.message)
            for p in problems_from(exc)
        ]
        return []


class _NotJsonError(ValueError):
    """A value no JSON document, and so no Kubernetes object, can hold."""

    def __init__(self, loc: tuple[int | str, ...], message: str) -> None:
        self.path = format_path(loc)
        super().__init__(message)


# A job has a few hundred values; aliases that expand past this are a YAML bomb.
MAX_VALUES = 100_000
TOO_DEEP = "values nested too deeply to be a job"


def _as_json(document: dict[str, Any]) -> Any:
    """The document as the API server would store it: JSON types only, a number
    with no fraction (`200.0`) an integer, an explicit !!timestamp its ISO text."""
    count = 0

    def convert(value: Any, loc: tuple[int | str, ...], within: frozenset[int]) -> Any:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _NotJsonError(loc, f"more than {MAX_VALUES} values: YAML aliases expand too far")
        if isinstance(value, dict | list):
            if id(value) in within:
                raise _NotJsonError(loc, "a YAML alias refers to a value that holds it")
            within = within | {id(value)}
            if isinstance(value, dict):
                return {str(k): convert(v, (*loc, str(k)), within) for k, v in value.items()}
            return [convert(v, (*loc, i), within) for i, v in enumerate(value)]
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, datetime.date):
            return value.isoformat()
        if value is None or isinstance(value, str | int | float):
            return value
        tags: dict[type, str] = {bytes: "!!binary", set: "!!set"}
        tag = tags.get(type(value), type(value).__name__)
        raise _NotJsonError(loc, f"a {tag} value has no place in a job; write it as plain text")

    return convert(document, (), frozenset())


def load_file(path: str | Path) -> LoadResult:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return LoadResult(source, problems=[FieldProblem("", "no such file")])
    except (OSError, UnicodeDecodeError) as exc:
        return LoadResult(source, problems=[FieldProblem("", f"cannot read: {exc}")])
    return load_text(text, source)


def load_job(path: str | Path) -> FineTuneJob:
    """Exactly one valid FineTuneJob from `path`, or JobFileError."""
    result = load_file(path)
    if result.ok and len(result.jobs) != 1:
        result.problems.append(
            FieldProblem("", f"expected one FineTuneJob, found {len(result.jobs)}")
        )
    if not result.ok:
        raise JobFileError(result)
    return result.jobs[0]
