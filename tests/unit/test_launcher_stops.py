"""A stop reaches every training process, however it races their start.

The launcher holds the stop signals on its own thread while it starts a process, but a
signal may land on another of its threads (torch's); Python then runs the launcher's
handler on the main thread in the middle of `Popen`, before the new process is in the
list the handler passes the stop on to. Here the handler runs there on purpose, and a
stand-in for the worker's interpreter says whether the stop reached it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
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
