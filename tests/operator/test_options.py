"""The operator's command line against its environment: an option given wins; a bad
setting stops it at start, naming the option and its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.config import OperatorConfig
from finetune_operator.main import build_parser, main, namespaces_of


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


SET_BY_MAIN = (
    "FINETUNE_TRAINER_IMAGE",
    "FINETUNE_PUSHGATEWAY_URL",
    "FINETUNE_RECONCILE_SECONDS",
    "FINETUNE_METRICS_PORT",
    "FINETUNE_HEALTH_PORT",
)
BAD_URLS = [
    "http://gw:notaport",
    "http://[bad",
    "http://gw:70000",
    "gw:9091",
    "ftp://gw:9091",
    "http://:9091",
    "http://gw:9091?x=1",
    "http://user:secret@gw:9091",
]


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """`main` writes its settings into the environment: restored after the test. No
    cluster: an operator that got past its settings would stop there, with exit 1."""
    for name in SET_BY_MAIN:
        # Set, then deleted: a name monkeypatch only deleted while absent is not put back
        # as absent, and what `main` writes there would leak into later tests.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    return monkeypatch


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_pushgateway_url_stops_the_operator_at_start(
    operator_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    assert main(["--pushgateway-url", url]) == 2
    error = capsys.readouterr().err
    assert "--pushgateway-url (env FINETUNE_PUSHGATEWAY_URL)" in error
    assert repr(url) in error


def test_a_bad_pushgateway_url_in_the_environment_stops_it_too(
    operator_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator_env.setenv("FINETUNE_PUSHGATEWAY_URL", "http://gw:notaport")
    assert main([]) == 2
    assert "FINETUNE_PUSHGATEWAY_URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://gw:9091",
        "https://pushgateway.monitoring.svc.cluster.local:9091/",
        "http://[::1]:9091/prefix",
        "http://10.0.0.5",
    ],
)
def test_good_pushgateway_urls_are_taken(url: str) -> None:
    assert OperatorConfig.from_env({"FINETUNE_PUSHGATEWAY_URL": url}).pushgateway_url == url
