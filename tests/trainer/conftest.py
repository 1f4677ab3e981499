"""Fixtures for the trainer tests (the tiny model and images live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_status_api import FakeApi
from tests.trainer.processes import processes

__all__ = ["processes"]


@pytest.fixture
def api() -> Iterator[FakeApi]:
    """A stand-in Kubernetes API server recording the status patches (see `status_env`)."""
    server = FakeApi()
    yield server
    server.close()
