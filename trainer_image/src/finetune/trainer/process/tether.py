"""Workers die with their launcher.

A worker runs in a session of its own (so the terminal's Ctrl-C reaches only the
launcher, which passes it on once), and so nothing would end it when the launcher
dies: SIGKILL, the OOM killer, a closed SSH session. Two ties, both set first thing
in the worker: the kernel's parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`),
and a watchdog thread that notices the launcher's pid is no longer its parent
(everywhere, and for the one case the first misses: the parent *thread* that
started the worker ending while the launcher lives). An orphan is SIGKILLed: a stop
that saves a checkpoint needs the launcher to hold the output's lease meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

LAUNCHER_PID_ENV = "FINETUNE_LAUNCHER_PID"
# A file rank 0 holds while it sends a stop's checkpoint, the other ranks gone: the
# launcher then waits for it rather than take their exits for a failure.
SENDING_MARKER_ENV = "FINETUNE_SENDING_MARKER"
PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 0.5


def tie_to_launcher() -> None:
    """Arrange to be killed when the launcher named by `$FINETUNE_LAUNCHER_PID` dies."""
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0)
    if not launcher:
        return  # started by hand
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The launcher may have died before prctl: then we are already someone else's child.
    _exit_if_orphaned(launcher)
    threading.Thread(target=_watch, args=(launcher,), name="launcher-watchdog", daemon=True).start()


def _exit_if_orphaned(launcher: int) -> None:
    if os.getppid() != launcher:
        print(
            f"the launcher (pid {launcher}) is gone; this training process ends too",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGKILL)


def _watch(launcher: int) -> None:
    stop = threading.Event()
    while not stop.wait(WATCH_SECONDS):
        _exit_if_orphaned(launcher)
