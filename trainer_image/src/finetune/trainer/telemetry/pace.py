"""How fast a run goes: smoothed averages (the loss the status reports), and the one ETA
that both the job's status and Prometheus report."""

from __future__ import annotations

import time
from collections.abc import Callable

# Weight of the past in a smoothed value: about the last 10 steps count.
SMOOTHING = 0.9


class Smoothed:
    """An exponential moving average, bias-corrected so the first values are not
    pulled toward zero: after one value it is that value."""

    def __init__(self, decay: float = SMOOTHING) -> None:
        self.decay = decay
        self._sum = 0.0
        self._weight = 0.0

    def add(self, value: float) -> float:
        self._sum = self.decay * self._sum + (1 - self.decay) * value
        self._weight = self.decay * self._weight + (1 - self.decay)
        return self._sum / self._weight

    @property
    def value(self) -> float | None:
        return self._sum / self._weight if self._weight else None


class Pace:
    """The seconds left at the mean wall time per step since the first step this process
    finished.

    Wall time, not the steps' own: checkpoint saves and validations between steps take
    time the run's end waits for too. A mean over the whole run (a resumed one: since its
    resume) spreads their cost over the steps; a moving average jumped after each (7x for
    a 60 s checkpoint between 1 s steps), then underestimated until the next. The first
    step is left out: it holds the warm-up (and torch.compile's compilation).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start: tuple[int, float] | None = None  # (step, clock) of the first call

    def step_done(self, step: int, total_steps: int) -> int | None:
        """Note that `step` is done; the estimated seconds until `total_steps`, or None
        before a second step gives a step time."""
        now = self._clock()
        if self._start is None:
            self._start = (step, now)
        first_step, started = self._start
        if step <= first_step:
            return None
        step_time = (now - started) / (step - first_step)
        return round(step_time * max(0, total_steps - step))
