"""`$FINETUNE_LOG_LEVEL`: a level name in any case, and info with a warning otherwise."""

from __future__ import annotations

import logging

import pytest

from finetune.trainer.engine.worker import log_level


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (None, logging.INFO),
        ("", logging.INFO),
        ("debug", logging.DEBUG),
        (" WARNING ", logging.WARNING),
    ],
)
def test_a_level_name_in_any_case_is_taken(value: str | None, level: int) -> None:
    assert log_level(value) == (level, None)


def test_an_unknown_level_falls_back_to_info_and_says_so() -> None:
    level, warning = log_level("verbose")
    assert level == logging.INFO
    assert warning is not None
    assert "FINETUNE_LOG_LEVEL='verbose'" in warning
    assert "debug, info, warning, error" in warning
