"""Prompts the tokenizer cuts are warned about once each, by name and tokens lost
(with the character-level CLIP tokenizer the test models use: one token per letter)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from finetune.assets import write_tokenizer
from finetune.trainer.data import encoding
from finetune.trainer.data.encoding import MAX_PROMPT_WARNINGS, Encoder
from finetune.trainer.families import FAMILIES


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def encoder(tokenizer: Any, announce: bool = True) -> Encoder:
    components: Any = SimpleNamespace(tokenizer=tokenizer, family=FAMILIES["sd"])
    return Encoder(components, torch.device("cpu"), torch.float32, True, False, announce)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == encoding.__name__]


def test_a_long_prompt_is_named_once_with_the_tokens_dropped(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    long = "a photo of sks dog " + "x" * 80  # 14 + 80 letters, plus start and end: 96
    short = "a photo of sks dog"
    encode = encoder(tokenizer)
    with caplog.at_level(logging.WARNING):
        first = encode.tokens([long, short])
        encode.tokens([long, long])
    assert first["input_ids"].shape == (2, 77)  # still cut to the model's limit
    (message,) = warnings(caplog)
    assert "'a photo of sks dog xxxxxxxx" in message
    assert "…'" in message  # abbreviated
    assert "96 tokens long" in message
    assert "the last 19 are dropped" in message


def test_prompts_within_the_limit_and_quiet_ranks_say_nothing(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        encoder(tokenizer).tokens(["y" * 75])  # 75 + 2 = 77: fits exactly
        encoder(tokenizer, announce=False).tokens(["z" * 200])
    assert warnings(caplog) == []


def test_warnings_stop_after_a_few_distinct_prompts(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    encode = encoder(tokenizer)
    with caplog.at_level(logging.WARNING):
        for index in range(MAX_PROMPT_WARNINGS + 10):
            encode.tokens([f"{index} " + "w" * 100])
    messages = warnings(caplog)
    assert len(messages) == MAX_PROMPT_WARNINGS + 1
    assert (
        messages[-1] == f"{MAX_PROMPT_WARNINGS} prompts cut so far; further ones are not reported"
    )
