"""The stop request: signals to this very process end pauses and interruptible work."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from finetune.trainer.process import stopping


@pytest.fixture
def stop(monkeypatch: pytest.MonkeyPatch) -> Iterator[stopping.StopRequest]:
    # SIGHUP would point a terminal running pytest at /dev/null: not here.
    monkeypatch.setattr(stopping, "leave_terminal", lambda: None)
    request = stopping.StopRequest()
    yield request
    request.close()


def signal_soon(signum: int, delay: float = 0.2) -> threading.Timer:
    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.start()
    return timer


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_pause_ends_at_a_stop_signal(stop: stopping.StopRequest, signum: int) -> None:
    signal_soon(signum)
    started = time.monotonic()
    with pytest.raises(stopping.Stopped):
        stopping.pause(60)
    assert time.monotonic() - started < 5
    assert stop.requested
    assert stop.signal == signum


def test_interruptible_work_is_cut_at_once(stop: stopping.StopRequest) -> None:
    signal_soon(signal.SIGTERM)
    started = time.monotonic()
    with pytest.raises(stopping.Stopped), stop.interruptible():
        time.sleep(60)  # a blocking call: the handler raises out of it
    assert time.monotonic() - started < 5


def test_outside_interruptible_a_signal_only_asks(stop: stopping.StopRequest) -> None:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested  # the loop reads it at the end of its step
    with pytest.raises(stopping.Stopped):
        stop.raise_if_requested()


def test_close_puts_the_handlers_back() -> None:
    before = signal.getsignal(signal.SIGINT)
    request = stopping.StopRequest()
    assert stopping.current() is request
    request.close()
    assert signal.getsignal(signal.SIGINT) is before
    assert stopping.current() is None
