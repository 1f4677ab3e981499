"""Processes a test starts, ended when the test ends, also when it fails.

Workers run in sessions of their own, so a process-group kill misses them: a tree is
found through /proc and SIGKILLed whole. Use the `processes` fixture (register every
`Popen` in it) rather than killing at the end of a test body, which a failed assert
never reaches.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest


def children_of() -> dict[int, list[int]]:
    """Every live process's children, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    children = children_of()
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def alive(pid: int) -> bool:
    """Running: a zombie waiting for its reaper has ended."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_tree(process: subprocess.Popen[Any]) -> None:
    """SIGKILL `process` and everything below it at once, as when a node dies."""
    for pid in [process.pid, *descendants(process.pid)]:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    """Register each `Popen` a test starts; the tree of each is killed at teardown."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for process in started:
        if process.poll() is None:
            kill_tree(process)
        with suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=60)
