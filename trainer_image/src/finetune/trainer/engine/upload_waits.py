"""A run's waits for its uploads to an `s3://` output, at a stop and at its end.

A stop (Ctrl-C, SIGTERM) still waits for them: its checkpoint is only safe once it is in
the store. While it waits, rank 0 says for what and how to leave; a second stop leaves
the uploads (exit 130 at once), the local checkpoint kept and marked, so the next run
sends it before anything else (`Replica.restore`).
"""

from __future__ import annotations

import os

from finetune.api.pod import JOB_NAME_ENV
from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.run_checkpoints import RunCheckpoints
from finetune.trainer.process.stopping import Patience, Stopped, StopRequest


def again() -> str:
    """How to leave the uploads: at a terminal Ctrl-C; in a pod (no terminal, stopped by
    the kubelet's SIGTERM) another SIGTERM, before the grace period's SIGKILL ends it."""
    return (
        "a second SIGTERM leaves" if JOB_NAME_ENV in os.environ else "press Ctrl-C again to leave"
    )


def checkpoints_sent(
    checkpoints: RunCheckpoints, stop: StopRequest, output_uri: str, main: bool
) -> bool:
    """On every rank: wait until every checkpoint saved counts; False when a second stop
    left their uploads."""

    def announce() -> None:
        if main:
            count = len(checkpoints.unsent())
            print(
                f"Stopping: waiting for {count} checkpoint upload(s) to {output_uri}; {again()} "
                "them (the local checkpoint is kept and a rerun uploads it)",
                flush=True,
            )

    try:
        checkpoints.finish(Patience(stop, announce).check)
    except Stopped:
        return False
    return True


def results_patience(stop: StopRequest, output_uri: str) -> Patience:
    """Rank 0's wait for the results' upload, which a second stop leaves."""

    def announce() -> None:
        print(
            f"Stopping: waiting for the results' upload to {output_uri}; {again()} it "
            "(every checkpoint is there: a rerun finishes the run)",
            flush=True,
        )

    return Patience(stop, announce)


def left_message(step: int, checkpoints: RunCheckpoints) -> str:
    """What rank 0 says once a second stop at `step` left checkpoint uploads."""
    folder = checkpoints.root / manifest.tag_for(max(checkpoints.unsent(), default=step))
    return (
        f"Stopped at step {step}; checkpoint {folder} is kept but not uploaded. "
        "Run the same command to upload it and resume."
    )
