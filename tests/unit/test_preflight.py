"""Checks the launcher makes before any worker starts."""

from __future__ import annotations

import os

import pytest

from finetune.trainer.errors import JobInputError
from finetune.trainer.launcher.preflight import checked_nproc


def test_nproc_defaults_and_limits() -> None:
    assert checked_nproc(None, 0) == 1
    assert checked_nproc(None, 8) == 8
    assert checked_nproc(3, 8) == 3
    with pytest.raises(
        JobInputError, match=r"--nproc 9: must be between 1 and 8 \(this machine has 8 GPUs\)"
    ):
        checked_nproc(9, 8)
    cores = os.cpu_count() or 1
    with pytest.raises(JobInputError, match=f"this machine has {cores} CPU cores"):
        checked_nproc(cores + 1, 0)
    with pytest.raises(JobInputError, match="--nproc 0"):
        checked_nproc(0, 0)
