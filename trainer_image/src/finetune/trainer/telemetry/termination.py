"""Why a pod failed, where Kubernetes shows it: the container's termination message."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Mapping
from pathlib import Path

from finetune.api.pod import TERMINATION_LOG, TERMINATION_LOG_ENV

TERMINATION_LIMIT = 4096  # bytes: Kubernetes keeps no more of the file
# Environment variables whose values must never appear in a message.
SECRET_NAME_PARTS = ("TOKEN", "SECRET", "PASSWORD", "ACCESS_KEY", "API_KEY")


def termination_text(message: str, env: Mapping[str, str] | None = None) -> str:
    """`message` as one paragraph of at most 4096 bytes, secret values replaced by `***`."""
    env = os.environ if env is None else env
    for name, value in env.items():
        if len(value) >= 8 and any(part in name.upper() for part in SECRET_NAME_PARTS):
            message = message.replace(value, "***")
    text = " ".join(message.split())
    return text.encode()[:TERMINATION_LIMIT].decode("utf-8", "ignore")


def write_termination_message(
    message: str, env: Mapping[str, str] | None = None, *, replace: bool = False
) -> bool:
    """Leave `message` where Kubernetes reads a failed container's reason; True when
    written. Never raises.

    Written only where the file's folder exists and may be written to, and, for
    the default `/dev/termination-log`, only when the file exists (Kubernetes
    creates it; `finetune run` on a workstation must not). The first message wins:
    the first rank to fail names the cause, later ones tend to report its effects;
    `replace` overrides that for a cause known to come before them all (a rank the
    kernel killed, which could leave no message of its own).
    """
    env = os.environ if env is None else env
    explicit = env.get(TERMINATION_LOG_ENV)
    path = Path(explicit or TERMINATION_LOG)
    try:
        if not path.parent.is_dir():
            return False
        if path.exists():
            if not os.access(path, os.W_OK):
                return False
        elif not explicit or not os.access(path.parent, os.W_OK):
            return False
        with path.open("a", encoding="utf-8") as handle:
            with contextlib.suppress(OSError):  # best effort: some filesystems cannot lock
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if os.fstat(handle.fileno()).st_size > 0:
                if not replace:
                    return False
                handle.truncate(0)
            handle.write(termination_text(message, env))
        return True
    except OSError:
        return False
