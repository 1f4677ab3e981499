"""Checks the launcher makes before any worker starts."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from finetune.trainer.errors import JobInputError
from finetune.trainer.launcher.preflight import check_output, checked_nproc
from finetune.trainer.launcher.run import new_plan_file
from finetune.trainer.storage.s3 import S3Settings


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


def test_a_new_plan_file_clears_what_a_killed_launcher_of_this_node_left(
    tmp_path: Path,
) -> None:
    """A SIGKILLed launcher never removes its plan; the next launch on that node does."""
    first = new_plan_file(tmp_path, node_rank=0)
    first.write_text("{}")
    other_node = new_plan_file(tmp_path, node_rank=1)
    other_node.write_text("{}")

    second = new_plan_file(tmp_path, node_rank=0)
    assert second != first
    assert not first.exists()
    assert other_node.exists()  # a shared output: another node's plan is that node's


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda out: (out / ".run").write_text(""), ".run is a file; runs keep a folder there"),
        (
            lambda out: (out / ".run" / "lease").mkdir(parents=True),
            ".run/lease is a folder; runs keep a file there",
        ),
        (
            lambda out: ((out / ".run").mkdir(), (out / "checkpoints").write_text("")),
            "checkpoints is a file; runs keep a folder there",
        ),
    ],
    ids=[".run-file", "lease-folder", "checkpoints-file"],
)
def test_an_output_whose_run_layout_is_taken_is_refused_before_training(
    tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    """Found before any worker starts, not as a traceback when the lease is taken or
    after the first steps, when the first checkpoint is saved."""
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    with pytest.raises(JobInputError, match=f"^spec.output.uri: {out}/{re.escape(message)}$"):
        check_output(str(out), out, S3Settings())
