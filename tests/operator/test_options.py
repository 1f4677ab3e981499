"""The operator's command line against its environment: an option given wins."""

from __future__ import annotations

import pytest

from finetune_operator.main import build_parser, namespaces_of


def namespaces(monkeypatch: pytest.MonkeyPatch, env: str | None, *argv: str) -> list[str]:
    if env is None:
        monkeypatch.delenv("FINETUNE_NAMESPACES", raising=False)
    else:
        monkeypatch.setenv("FINETUNE_NAMESPACES", env)
    return namespaces_of(build_parser().parse_args(list(argv)))


def test_namespaces_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert namespaces(monkeypatch, "ml,research") == ["ml", "research"]
    assert namespaces(monkeypatch, None) == []  # every namespace


def test_namespaces_on_the_command_line_replace_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert namespaces(monkeypatch, "ml,research", "-n", "team-a") == ["team-a"]
    assert namespaces(monkeypatch, None, "-n", "a", "--namespace", "b") == ["a", "b"]
