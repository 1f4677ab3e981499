"""How fast a run goes: smoothed averages, and the one ETA that both the job's status
and Prometheus report."""

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
    """The smoothed wall time between finished steps, and the seconds left at it.

    Wall time, not the steps' own: checkpoint saves and samples between steps take
    time the run's end waits for too.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._step_time = Smoothed()
        self._previous: tuple[int, float] | None = None  # (step, clock) of the last call

    def step_done(self, step: int, total_steps: int) -> int | None:
        """Note that `step` is done; the estimated seconds until `total_steps`, or None
        before a second step gives a step time."""
        now = self._clock()
        if self._previous is not None and step > self._previous[0]:
            last_step, last_time = self._previous
            self._step_time.add((now - last_time) / (step - last_step))
        self._previous = (step, now)
        step_time = self._step_time.value
        return round(step_time * max(0, total_steps - step)) if step_time is not None else None
