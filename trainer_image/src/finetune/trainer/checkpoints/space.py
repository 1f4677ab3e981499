"""A full disk (or a file-size limit) met while saving, told as what to do about it."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.trainer.errors import DiskFull

NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def _no_space(folder: Path) -> OSError | None:
    """Whether `folder`'s file system takes 1 MiB more: torch's writer reports a failed
    write without its errno, so a probe file finds the cause."""
    probe = folder / ".space-probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as handle:
            handle.write(b"\0" * (1 << 20))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return exc if exc.errno in NO_SPACE else None
    finally:
        probe.unlink(missing_ok=True)
    return None


CHECKPOINT_ADVICE = (
    "The previous checkpoint is intact; give the job more local disk (or lower "
    "spec.checkpointing.keepLast) and run it again to resume"
)
RESULTS_ADVICE = (
    "Every checkpoint is intact; give the job more local disk (or lower "
    "spec.checkpointing.keepLast) and run it again: it trains no step and saves them"
)


@contextmanager
def space_checked(
    folder: Path, step: int, what: str = "the checkpoint", advice: str = CHECKPOINT_ADVICE
) -> Iterator[None]:
    """Turn a full disk (or a file-size limit) met while saving `what` into a `DiskFull`
    that says where and what to do (`advice`); a checkpoint then never gets a manifest."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        cause = exc if isinstance(exc, OSError) and exc.errno in NO_SPACE else None
        if cause is None and not isinstance(exc, OSError):
            cause = _no_space(folder)
        if cause is None:
            raise
        raise DiskFull(
            f"{folder}: no space left to save {what} of step {step} ({cause.strerror}). {advice}"
        ) from exc
