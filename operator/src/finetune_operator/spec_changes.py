"""Which spec changes a running job takes, and which it refuses.

A job's training spec is fixed when it is created (the trainer's job file is
written then, and checkpoints are only valid for the spec that wrote them).
Only the run policy's knobs take effect later. The API server refuses any other
change once the job has started (a CEL rule of the CRD); one made before (or
where the rule is not enforced) is ignored with a Warning event, never
half-applied.
"""

from __future__ import annotations

from typing import Any

from finetune.api.cluster import MUTABLE_RUN_POLICY

MUTABLE = frozenset(f"spec.runPolicy.{knob}" for knob in MUTABLE_RUN_POLICY)


def changed_paths(old: Any, new: Any, path: str = "spec") -> list[str]:
    """Dotted paths of every leaf that differs; lists compare whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths: list[str] = []
        for key in sorted(set(old) | set(new)):
            paths += changed_paths(old.get(key), new.get(key), f"{path}.{key}")
        return paths
    if isinstance(old, dict) or isinstance(new, dict):
        if not old and not new:
            return []
        return changed_paths(old or {}, new or {}, path) if old is None or new is None else [path]
    return [] if old == new else [path]


def split(old: Any, new: Any) -> tuple[list[str], list[str]]:
    """(applied, ignored) paths of a spec change."""
    paths = changed_paths(old or {}, new or {})
    return [p for p in paths if p in MUTABLE], [p for p in paths if p not in MUTABLE]
