"""The message a failed pod leaves where Kubernetes shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.trainer.telemetry import termination
from finetune.trainer.telemetry.termination import write_termination_message


def test_termination_message_is_one_paragraph_without_secrets(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    env = {"FINETUNE_TERMINATION_LOG": str(log), "HF_TOKEN": "hf_secretvalue123"}
    message = "download failed\n  with hf_secretvalue123\n\tin the URL"
    assert write_termination_message(message, env)
    assert log.read_text() == "download failed with *** in the URL"
    # The first failure names the cause; later ones do not replace it.
    assert not write_termination_message("rank 1 failed: connection reset", env)
    assert log.read_text() == "download failed with *** in the URL"
    # Unless the cause is known to come first (a rank the kernel killed).
    assert write_termination_message("rank 1 was killed by SIGKILL", env, replace=True)
    assert log.read_text() == "rank 1 was killed by SIGKILL"


def test_termination_message_is_cut_at_4096_bytes(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    assert write_termination_message("é" * 5000, {"FINETUNE_TERMINATION_LOG": str(log)})
    written = log.read_bytes()
    assert len(written) <= 4096
    assert written.decode() == "é" * 2048


def test_termination_message_only_where_it_may_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-folder" / "termination-log"
    assert not write_termination_message("x", {"FINETUNE_TERMINATION_LOG": str(missing)})
    assert not missing.parent.exists()
    # The default file is used only when Kubernetes made it: a workstation run,
    # even as root, must not create it.
    default = tmp_path / "termination-log"
    monkeypatch.setattr(termination, "TERMINATION_LOG", str(default))
    assert not write_termination_message("x", {})
    assert not default.exists()
    default.touch()
    assert write_termination_message("it failed", {})
    assert default.read_text() == "it failed"
