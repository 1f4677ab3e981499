"""An exclusive `flock` taken with a wait that a stop request cuts short.

The kernel drops an flock when its holder dies however it dies, so a lock that can
be taken is never stale: the output lease and the DeepSpeed op build both rely on it.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.trainer.process import stopping


def take(fd: int, wait: float | None, on_wait: Callable[[], None]) -> bool:
    """Lock `fd` exclusively, waiting up to `wait` seconds (None: as long as it takes);
    `on_wait` runs once, when the lock is held elsewhere and there is time to wait.
    False when the time ran out."""
    deadline = None if wait is None else time.monotonic() + wait
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if not announced:
            on_wait()
            announced = True
        stopping.pause(0.5)  # a stop request ends the wait


@contextmanager
def held(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """The flock of the file `path` (made if missing) for the block, waited for as long
    as it takes (a stop request ends the wait); `on_wait` as for `take`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        take(fd, None, on_wait)
        yield
    finally:
        os.close(fd)  # and the lock with it
