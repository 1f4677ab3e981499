"""Fixtures for the trainer tests (the tiny model and images live in tests/conftest.py)."""

from __future__ import annotations

from tests.trainer.processes import processes

__all__ = ["processes"]
