"""Fixtures shared by trainer and operator tests: a tiny real diffusers model and
images, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune.assets import build_evaluators, build_model, build_sdxl_model, write_images
from tests.fake_status_api import FakeApi


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def disc_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "discs", 6, resolution=64)


@pytest.fixture(scope="session")
def tiny_evaluators(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Random tiny CLIP and DINO folders, as `validation.evaluator` names them."""
    return build_evaluators(tmp_path_factory.mktemp("evaluators"))


@pytest.fixture
def api() -> Iterator[FakeApi]:
    """A stand-in Kubernetes API server recording the status patches (see `status_env`)."""
    server = FakeApi()
    yield server
    server.close()
