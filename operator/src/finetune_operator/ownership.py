"""Whose an object is: the uid in its controller ownerReference.

A job's children are named after it, and its Jobs' pods are labelled with its name
and attempt, so a FineTuneJob deleted and created again under its name meets its
predecessor's children until the garbage collector has removed them, and a Job
deleted by hand leaves pods that terminate beside its replacement's. Names and
labels cannot tell them apart; the owner's uid can. Pure: objects in the shape the
API returns them (or the indexes keep them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound=Mapping[str, Any])


def controller(meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference of the object's controller, if it has one."""
    for reference in meta.get("ownerReferences") or []:
        if reference.get("controller"):
            return dict(reference)
    return None


def owned(objects: Iterable[T], uid: str | None) -> list[T]:
    """Those of `objects` whose controller is the object of `uid`."""
    return [
        obj
        for obj in objects
        if uid and (controller(obj.get("metadata") or {}) or {}).get("uid") == uid
    ]


def holder(meta: Mapping[str, Any], kind: str, name: str) -> tuple[bool, str]:
    """Who holds a name a FineTuneJob `name` wants for one of its children (`meta`, the
    existing object's): whether it is a previous FineTuneJob of that name, and who."""
    owner = controller(meta)
    if owner is None:
        return False, "no owner"
    previous = owner.get("kind") == kind and owner.get("name") == name
    return previous, f"{owner.get('kind')} {owner.get('name')}"
