"""The one retry policy for remote stores (S3 and the hub): exponential backoff with full
jitter while a failure is transient, for at most a time budget.

The clients' own quick retries (botocore's, a few tries) absorb blips; this loop rides
out a longer outage. Its waits end at once on a stop request (`stopping.pause` raises
`Stopped`), so Ctrl-C is never stuck behind an outage.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from finetune.trainer.process import stopping

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a transient failure (an outage) is retried, at most.
RETRY_FOR_ENV = "FINETUNE_S3_RETRY_SECONDS"
DEFAULT_RETRY_FOR = 3600.0
MAX_BACKOFF = 10.0


def retry_budget() -> float:
    """Seconds a transient failure is retried (`$FINETUNE_S3_RETRY_SECONDS`, also for the hub)."""
    return float(os.environ.get(RETRY_FOR_ENV, DEFAULT_RETRY_FOR))


def with_retries(
    what: str,
    call: Callable[[], T],
    is_transient: Callable[[BaseException], bool],
    retry_for: float | None = None,
) -> T:
    """`call()`, tried again with exponential backoff and full jitter while it fails
    transiently, for at most `retry_for` seconds; anything else is raised at once."""
    budget = retry_for if retry_for is not None else retry_budget()
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() >= deadline:
                raise
            delay = random.uniform(0, min(MAX_BACKOFF, 0.5 * 2**attempt))
            delay = min(delay, max(0.0, deadline - time.monotonic()))  # no wait past the budget
            attempt += 1
            log.warning("%s: %s; trying again in %.1f s (try %d)", what, exc, delay, attempt)
            stopping.pause(delay)
