"""A clean stop on request, without torch.

SIGINT (Ctrl-C), SIGTERM (a pod's end) and SIGHUP (a closed terminal) all ask for the
same stop. A process installs one `StopRequest` first thing, so a signal during start-up
is remembered, not fatal. What the process does decides how fast it answers:

- the training loop reads `requested` once a step (all ranks agree, then checkpoint);
- waits (retry backoffs, polls) go through `pause`, which ends early with `Stopped`;
- work a stop still waits for (the uploads of its checkpoint) runs `outlasting_a_stop()`
  and is waited for with a `Patience`: it says what it waits for, and a second signal
  (the stop `repeated`) leaves it;
- blocking work with nothing to save (downloads, loading a model) runs inside
  `interruptible()`, where the signal raises `Stopped` in the main thread at once;
- pipelines (class images, samples) check `raise_if_requested` between their steps;
- a blocking call in C that may never come back to Python (the rendezvous, waiting for
  peers that may never come) runs inside `ends_process()`: the signal's default action.

The handler sets a flag (or raises), and after SIGHUP points standard output and error
at /dev/null (`leave_terminal`: system calls only): no locks are taken in signal context.
"""

from __future__ import annotations

import errno
import os
import signal
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What a stop says when it came before the first step: there was nothing to save.
STOPPED_BEFORE_TRAINING = "Stopped before training began; nothing was written."
# How often a pause looks at the flag: the bound on how late a stop is noticed there.
POLL_SECONDS = 0.1
# A stop that waits longer than this for work it lets finish says what it waits for.
ANNOUNCE_AFTER_SECONDS = 1.0


class Stopped(Exception):  # noqa: N818 - it is what happened, not a failure
    """A stop was requested while the process waited or did work it can drop."""


class StopRequest:
    """SIGINT/SIGTERM/SIGHUP ask for a clean stop: finish the step, checkpoint, exit 130."""

    def __init__(self) -> None:
        global _current
        self.requested = False
        self.repeated = False  # asked again: leave what the first request waits for
        self.signal: int | None = None
        self._raising = 0
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        # A process started with the stop signals held (`held_for_children`) gets the
        # ones that came meanwhile now, in the handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        _current = self

    def close(self) -> None:
        """Put back the handlers found (for a caller that goes on, like a test)."""
        global _current
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if _current is self:
            _current = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.repeated = self.requested
        self.requested = True
        self.signal = signum
        if signum == signal.SIGHUP:
            leave_terminal()
        if self._raising:
            raise Stopped(f"stopped by {signal.Signals(signum).name}")

    def raise_if_requested(self) -> None:
        if self.repeated or (self.requested and not getattr(_outlasting, "on", False)):
            raise Stopped("stopped on request")

    def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or raise `Stopped` as soon as a stop is asked for."""
        deadline = time.monotonic() + seconds
        while True:
            self.raise_if_requested()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(POLL_SECONDS, left))

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A signal inside this block raises `Stopped` in the main thread right away
        (also out of a blocking read); use it only where dropping the work is safe."""
        self.raise_if_requested()
        self._raising += 1
        try:
            yield
        finally:
            self._raising -= 1

    @contextmanager
    def ends_process(self) -> Iterator[None]:
        """A signal inside this block ends the process at once, as if no handler were
        installed. For waits in C that run no Python handler until they return, where
        there is nothing to save yet."""
        self.raise_if_requested()
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        try:
            yield
        finally:
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._handle)


@contextmanager
def held_for_children() -> Iterator[None]:
    """Processes started inside this block begin with the stop signals held, not lost
    and not fatal, until their `StopRequest` is in (a Python interpreter takes seconds
    to get there, and a SIGINT before it kills it with a traceback)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:  # what came meanwhile reaches this process's own handler now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_current: StopRequest | None = None
_outlasting = threading.local()


@contextmanager
def outlasting_a_stop() -> Iterator[None]:
    """On this thread, pauses and checks in this block go on through a stop request and
    end only once it is repeated: for work the stop itself waits for (uploads)."""
    before = getattr(_outlasting, "on", False)
    _outlasting.on = True
    try:
        yield
    finally:
        _outlasting.on = before


class Patience:
    """A wait for work a stop lets finish. `check()`, called while waiting, runs
    `announce` once a stop has been asked for and the wait has lasted
    `ANNOUNCE_AFTER_SECONDS` (to say what it waits for and how to leave it), and raises
    `Stopped` once the stop is repeated."""

    def __init__(self, stop: StopRequest | None, announce: Callable[[], None]) -> None:
        self.stop = stop
        self.announce = announce
        self.started = time.monotonic()
        self.announced = False

    def check(self) -> None:
        stop = self.stop
        if stop is None or not stop.requested:
            return
        if stop.repeated:
            raise Stopped("stopped again: what the stop waited for is left")
        if not self.announced and time.monotonic() - self.started >= ANNOUNCE_AFTER_SECONDS:
            self.announced = True
            self.announce()


def leave_terminal() -> None:
    """After SIGHUP the terminal is gone, and writing to it fails (EIO): point standard
    output and error at /dev/null where they were a terminal, so the stop that follows
    (a checkpoint, its message) is not cut short by a write. Files and pipes stay as they
    are."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            if _terminal(fd):
                os.dup2(null, fd)
    finally:
        os.close(null)


def _terminal(fd: int) -> bool:
    """A terminal, also one that has hung up: `isatty` says False for that one, since the
    kernel answers its every ioctl with EIO where anything else that is not a terminal
    answers ENOTTY."""
    try:
        termios.tcgetattr(fd)
    except termios.error as exc:
        return bool(exc.args[0] == errno.EIO)
    return True


def current() -> StopRequest | None:
    """The process's stop request, once one is installed."""
    return _current


def pause(seconds: float) -> None:
    """`time.sleep`, cut short by a stop request when this process has one."""
    if _current is None:
        time.sleep(seconds)
    else:
        _current.pause(seconds)


def raise_if_requested() -> None:
    if _current is not None:
        _current.raise_if_requested()
