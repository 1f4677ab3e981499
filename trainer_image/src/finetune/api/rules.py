"""Reporting rules that span several fields, each problem named by its path.

A pydantic model validator can raise only one error, located at the model. A
job can break several rules at once, and a user wants to see every one with
the field it concerns, so rules collect `Problem`s and raise them together as
one error whose context lists them; `finetune.api.errors` expands it again.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic_core import PydanticCustomError

RULE_ERROR_TYPE = "job_rules"


@dataclass(frozen=True)
class Problem:
    path: str  # dotted camelCase path relative to the model that found it
    message: str


def raise_problems(problems: list[Problem]) -> None:
    if not problems:
        return
    raise PydanticCustomError(
        RULE_ERROR_TYPE,
        "{summary}",
        {
            "summary": "; ".join(f"{p.path}: {p.message}" for p in problems),
            "problems": [{"path": p.path, "message": p.message} for p in problems],
        },
    )
