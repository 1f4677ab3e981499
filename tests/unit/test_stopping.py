"""The stop request: signals to this very process end pauses and interruptible work."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
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


# On a terminal of its own: once asked to stop, it says so, as a run's last words do.
SAYS_IT_STOPPED = """
import os, time
from finetune.trainer.process import stopping
stop = stopping.StopRequest()
print("ready", flush=True)
while not stop.requested:
    time.sleep(0.05)
print("Stopped at step 7; checkpoint saved.", flush=True)
os._exit(0)
"""


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


def test_a_second_signal_is_a_repeated_stop(stop: stopping.StopRequest) -> None:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested
    assert not stop.repeated
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.repeated


def test_work_a_stop_waits_for_pauses_through_the_first_signal_only(
    stop: stopping.StopRequest,
) -> None:
    os.kill(os.getpid(), signal.SIGINT)
    with stopping.outlasting_a_stop():
        stopping.pause(0.2)  # an upload's retry backoff goes on
        signal_soon(signal.SIGINT)
        started = time.monotonic()
        with pytest.raises(stopping.Stopped):
            stopping.pause(60)
        assert time.monotonic() - started < 5
    with pytest.raises(stopping.Stopped):
        stopping.pause(0.1)


def test_patience_says_what_it_waits_for_once_then_a_second_stop_leaves(
    stop: stopping.StopRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stopping, "ANNOUNCE_AFTER_SECONDS", 0.0)
    said: list[str] = []
    patience = stopping.Patience(stop, lambda: said.append("waiting"))
    patience.check()
    assert said == []  # no stop asked for: nothing to say
    os.kill(os.getpid(), signal.SIGINT)
    patience.check()
    patience.check()
    assert said == ["waiting"]
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(stopping.Stopped):
        patience.check()


@pytest.mark.parametrize(
    ("in_pod", "how"), [(False, "press Ctrl-C again to leave it"), (True, "a second SIGTERM")]
)
def test_the_wait_for_uploads_says_how_to_leave_where_the_run_is(
    stop: stopping.StopRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    in_pod: bool,
    how: str,
) -> None:
    from finetune.api.pod import JOB_NAME_ENV
    from finetune.trainer.engine.upload_waits import results_patience

    monkeypatch.delenv(JOB_NAME_ENV, raising=False)
    if in_pod:  # the operator names the job in every training pod; no terminal there
        monkeypatch.setenv(JOB_NAME_ENV, "sks-dog")
    monkeypatch.setattr(stopping, "ANNOUNCE_AFTER_SECONDS", 0.0)
    patience = results_patience(stop, "s3://bucket/run")
    os.kill(os.getpid(), signal.SIGTERM)
    patience.check()
    said = capsys.readouterr().out
    assert "waiting for the results' upload to s3://bucket/run" in said
    assert how in said
    assert ("Ctrl-C" in said) is not in_pod


def test_a_closed_terminals_stop_is_not_cut_short_by_writing_to_it() -> None:
    """The terminal hangs up (its other end closed), the kernel's SIGHUP asks for the
    stop, and what the stop then prints goes nowhere instead of failing with EIO: the
    hung-up terminal no longer passes for a terminal (`isatty`), yet it is left."""
    pid, terminal = pty.fork()
    if pid == 0:  # a fresh interpreter: no pytest threads in the child
        os.execv(sys.executable, [sys.executable, "-c", SAYS_IT_STOPPED])
    shown = b""
    try:
        deadline = time.monotonic() + 60
        while b"ready" not in shown:  # its handler is in
            assert time.monotonic() < deadline, shown
            if select.select([terminal], [], [], 0.5)[0]:
                shown += os.read(terminal, 4096)
    finally:
        os.close(terminal)  # the last close of the terminal's other end: a hang-up
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, shown
