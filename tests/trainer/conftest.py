"""Fixtures for the trainer tests (the tiny model and images live in tests/conftest.py)."""

from tests.trainer.processes import processes

__all__ = ["processes"]
