"""A clean stop on request, without torch: the worker installs it before anything
slow is imported, so a signal during start-up is remembered, not fatal."""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    """SIGINT/SIGTERM ask for a clean stop: finish the step, checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
