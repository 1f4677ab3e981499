"""A stop reaches every training process, however it races their start.

The launcher holds the stop signals on its own thread while it starts a process, but a
signal may land on another of its threads (torch's); Python then runs the launcher's
handler on the main thread in the middle of `Popen`, before the new process is in the
list the handler passes the stop on to. Here the handler runs there on purpose, and a
stand-in for the worker's interpreter says whether the stop reached it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from finetune.api.pod import EXIT_INTERRUPTED
from finetune.trainer.launcher.run import Rendezvous, Workers

# A worker in miniature: it takes the held stop signals once its handler is in (as
# `StopRequest` does), exits 130 on a stop, and 0 after a while without one.
WORKER = """
    import signal, sys, time
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    time.sleep(10)
"""


def test_a_stop_taken_while_a_worker_starts_still_reaches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interpreter = tmp_path / "python"
    interpreter.write_text(f"#!{sys.executable}\n{textwrap.dedent(WORKER)}")
    interpreter.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(interpreter))
    workers = Workers(tmp_path / "plan.json", Rendezvous(nproc_per_node=1))
    popen = subprocess.Popen

    def starting(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        workers._forward(signal.SIGINT, None)  # the handler, run while the process starts
        return popen(*args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "Popen", starting)
    started = time.monotonic()
    assert workers.run() == EXIT_INTERRUPTED
    assert time.monotonic() - started < 8, "the worker ran on as if never stopped"


# Rank 0 after a stop: it holds its marker while its manifest goes up after the other
# ranks' files, so it leaves last (a SIGTERM, the second stop it would take for, leaves
# the upload); the others leave once their files are up. `blocked`: a process caught in a collective, which runs no handler.
RANKS = """
    import os, signal, sys, time
    marks = sys.argv[-1] + ".rank" + os.environ["LOCAL_RANK"]
    def stop(signum, frame):
        if os.environ["LOCAL_RANK"] != "0":
            time.sleep(0.5)  # its files up after rank 0 took its marker, as in training
            sys.exit(130)
        signal.signal(signal.SIGTERM, lambda *_: (open(marks, "w").write("left"), sys.exit(130)))
        if not os.environ.get("CAUGHT"):  # sending the checkpoint, as `Trainer._stopped`
            open(os.environ["FINETUNE_SENDING_MARKER"], "w").close()
        time.sleep(1.5)
        open(marks, "w").write("sent")
        sys.exit(130)
    signal.signal(signal.SIGINT, stop)
    if os.environ.get("BLOCKED"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
    else:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    open(marks + ".up", "w").close()
    time.sleep(30)
"""


def workers_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lease_lost: Callable[[], bool] = lambda: False
) -> Workers:
    """Two ranks of `RANKS` (each marks `plan.rankN.up` once it takes signals)."""
    interpreter = tmp_path / "python"
    interpreter.write_text(f"#!{sys.executable}\n{textwrap.dedent(RANKS)}")
    interpreter.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(interpreter))
    return Workers(tmp_path / "plan", Rendezvous(nproc_per_node=2), lease_lost=lease_lost)


def ranks_up(tmp_path: Path) -> bool:
    return all((tmp_path / f"plan.rank{r}.up").exists() for r in (0, 1))


def stops_when_up(tmp_path: Path, count: int) -> None:
    """`count` Ctrl-Cs to this process (the launcher) once both ranks are up."""

    def send() -> None:
        while not ranks_up(tmp_path):
            time.sleep(0.05)
        for _ in range(count):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)

    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize(("caught", "rank_0"), [(False, "sent"), (True, "left")])
def test_one_stop_waits_for_rank_0_sending_its_checkpoint_after_the_others_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: bool, rank_0: str
) -> None:
    """The others' exit 130 is the stop going as planned, not a failure to end rank 0 for
    while it holds its sending marker. Rank 0 caught elsewhere (a collective the others
    left) holds none: the others' exits end it after the usual grace, rather than the
    launcher waiting with no limit."""
    from finetune.trainer.launcher import run

    if caught:
        monkeypatch.setenv("CAUGHT", "1")
    monkeypatch.setattr(run, "STOP_GRACE", 5.0)
    workers = workers_of(tmp_path, monkeypatch)
    stops_when_up(tmp_path, 1)
    assert workers.run() == EXIT_INTERRUPTED
    assert (tmp_path / "plan.rank0").read_text() == rank_0


def test_the_third_stop_kills_processes_no_stop_reaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLOCKED", "1")
    workers = workers_of(tmp_path, monkeypatch)
    stops_when_up(tmp_path, 3)
    started = time.monotonic()
    assert workers.run() == EXIT_INTERRUPTED
    assert time.monotonic() - started < 10, "the stuck processes ran on"
    assert [p.returncode for p in workers.processes] == [-signal.SIGKILL] * 2


def test_a_lost_output_lease_kills_the_workers_before_they_write_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another run holds the output now: a checkpointed stop would write over its
    checkpoints, so the workers are killed, and the launcher says why."""
    from finetune.api.pod import EXIT_FAILED

    workers = workers_of(tmp_path, monkeypatch, lease_lost=lambda: ranks_up(tmp_path))
    assert workers.run() == EXIT_FAILED
    assert [p.returncode for p in workers.processes] == [-signal.SIGKILL] * 2
    assert "another run took the output's lease over" in capsys.readouterr().err


def state_of(pid: int) -> str:
    """A process's state letter from /proc: T when stopped."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_ctrl_z_stops_the_workers_with_the_launcher_and_fg_continues_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers' own session keeps the terminal's SIGTSTP from them: Ctrl-Z stopped
    the launcher alone while the GPUs trained on. Here the launcher's own stop is only
    recorded (this process is the launcher), and the test looks at the workers then."""
    workers = workers_of(tmp_path, monkeypatch)
    seen: list[str] = []
    kill = os.kill

    def stop_self(pid: int, signum: int) -> None:
        if pid == os.getpid() and signum == signal.SIGSTOP:  # while "stopped":
            deadline = time.monotonic() + 5  # a SIGSTOP lands in a moment, not at once
            while time.monotonic() < deadline and any(
                state_of(p.pid) != "T" for p in workers.processes
            ):
                time.sleep(0.05)
            seen.extend(state_of(p.pid) for p in workers.processes)
            return
        kill(pid, signum)

    def press_ctrl_z() -> None:
        while not ranks_up(tmp_path):
            time.sleep(0.05)
        monkeypatch.setattr(os, "kill", stop_self)
        if signal.getsignal(signal.SIGTSTP) == workers._pause:  # else it would stop pytest
            kill(os.getpid(), signal.SIGTSTP)
        time.sleep(0.5)
        states.extend(state_of(p.pid) for p in workers.processes)  # once continued
        kill(os.getpid(), signal.SIGINT)

    states: list[str] = []
    threading.Thread(target=press_ctrl_z, daemon=True).start()
    assert workers.run() == EXIT_INTERRUPTED
    assert seen == ["T", "T"], "the workers trained on while the launcher was stopped"
    assert "T" not in states, "the workers were not continued"
