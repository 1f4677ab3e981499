"""Reading `train_log.jsonl`: one JSON object a line, appended as a run goes, so its last
line may be cut short by a crash. Everything that reads the log reads it through here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def entries(text: str) -> Iterator[dict[str, Any]]:
    """The complete entries of a train log's `text`, in order; a line a crash cut short
    (or anything not an object) is skipped."""
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            yield entry
