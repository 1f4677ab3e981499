"""A background thread that puts files in a store, in the order they were handed over,
so training never waits on the network.

Each task belongs to a checkpoint step; `uploaded_through()` is the newest step whose
tasks (and all earlier ones) are done. Manifests are urgent: they pass files that
still wait, so a checkpoint becomes durable as soon as its own files are up. Transient failures are retried inside the store
(see `retries.with_retries`); a permanent one stops the thread and is raised on the
training thread at its next `check()`. A stop request does not cut the uploads short
(`stopping.outlasting_a_stop`): a stop waits for its checkpoint's; the waits take a
`check` that may raise to leave them (`stopping.Patience.check`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from finetune.trainer.process import stopping
from finetune.trainer.storage.store import Store

log = logging.getLogger(__name__)
UPLOAD_NICENESS = 10
# How often a wait looks at the uploads (and at its `check`).
WAIT_POLL_SECONDS = 0.05


def _no_check() -> None:
    pass


@dataclass
class Task:
    step: int
    files: list[tuple[Path, str]] = field(default_factory=list)  # (local path, key)
    then: Callable[[], None] | None = None  # run in the thread once the files are up
    urgent: bool = False  # a manifest: goes before files still waiting


class Uploader:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.error: BaseException | None = None
        self.bytes_sent = 0
        self.seconds = 0.0
        # (0 urgent | 1 files | 2 stop, order handed over, task)
        self._queue: queue.PriorityQueue[tuple[int, int, Task | None]] = queue.PriorityQueue()
        self._handed = 0
        self._outstanding: Counter[int] = Counter()  # tasks not done, by step
        self._newest = -1
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    def submit(self, task: Task) -> None:
        """Hand over `task`; a checkpoint's files go one task per file, so an urgent
        task (a manifest) waits for one file at most, never for a whole checkpoint."""
        self.check()
        parts = [Task(task.step, [f]) for f in task.files[:-1]]
        parts.append(Task(task.step, task.files[-1:], task.then, task.urgent))
        with self._lock:
            self._newest = max(self._newest, task.step)
            for part in parts:
                self._outstanding[part.step] += 1
                self._handed += 1
                self._queue.put((0 if part.urgent else 1, self._handed, part))

    def uploaded_through(self) -> int:
        """The newest step such that everything handed over for it, and before, is done."""
        with self._lock:
            waiting = [step for step, count in self._outstanding.items() if count > 0]
            return min(waiting) - 1 if waiting else self._newest

    def check(self) -> None:
        """Raise, on the caller's thread, what stopped the uploads."""
        if self.error is not None:
            raise self.error

    def waiting_steps(self) -> set[int]:
        """The steps with tasks not done yet."""
        with self._lock:
            return {step for step, count in self._outstanding.items() if count > 0}

    def wait(self, check: Callable[[], None] = _no_check) -> None:
        """Block until every task handed over so far is done (or one failed)."""
        with self._lock:
            newest = self._newest
        self.wait_for(newest, check)

    def wait_for(self, step: int, check: Callable[[], None] = _no_check) -> None:
        """Block until everything handed over for `step` and before is done; `check()`
        runs meanwhile, and what it raises ends the wait (the uploads go on)."""
        while self.uploaded_through() < step and self.error is None:
            check()
            time.sleep(WAIT_POLL_SECONDS)
        self.check()

    def close(self) -> None:
        with self._lock:
            self._handed += 1
            self._queue.put((2, self._handed, None))
        self._thread.join()

    def _run(self) -> None:
        # Below training in the CPU scheduler (Linux: nice is per thread, and the transfer
        # threads boto3 starts from here inherit it): uploads use what training leaves.
        with suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
        with stopping.outlasting_a_stop():
            self._serve()

    def _serve(self) -> None:
        while True:
            _, _, task = self._queue.get()
            if task is None:
                return
            try:
                if self.error is None:
                    self._do(task)
            except BaseException as exc:  # handed to the training thread
                if not isinstance(exc, stopping.Stopped):  # left on purpose: no failure
                    log.error("upload of checkpoint step %d failed: %s", task.step, exc)
                self.error = exc

    def _do(self, task: Task) -> None:
        started = time.perf_counter()
        for path, key in task.files:
            self.store.put_file(path, key)
            self.bytes_sent += path.stat().st_size
        self.seconds += time.perf_counter() - started
        if task.then is not None:
            task.then()
        with self._lock:
            self._outstanding[task.step] -= 1
