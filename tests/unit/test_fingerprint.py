"""A model folder's fingerprint: the same files give the same one wherever the folder
is; another model gives another; a large weight file is only sampled, never read whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune.api.job import FineTuneJob
from finetune.assets import build_model, write_captioned_images
from finetune.trainer.checkpoints.layout import run_layout
from finetune.trainer.launcher.run import prepare
from finetune.trainer.models.fingerprint import CHUNK, WHOLE, fingerprint, sampled_regions
from tests.support import lcm_job

LARGE = 8 * CHUNK


def model_folder(root: Path) -> Path:
    """A model-like folder: small configs and one large (sparse) weight file."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "unet" / "config.json").write_text('{"sample_size": 64}')
    with (root / "unet" / "diffusion_pytorch_model.safetensors").open("wb") as weights:
        weights.truncate(LARGE)
    return root


def poke(path: Path, offset: int) -> None:
    """One byte of `path` changed at `offset`."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x01")


def test_the_same_files_give_the_same_fingerprint_wherever_they_are(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model")
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    assert fingerprint(folder) == fingerprint(folder) == fingerprint(moved)
    # What is not the model: a hidden file, an unfinished download, the model card.
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs")
    (folder / "unet" / "extra.bin.partial").write_bytes(b"half")
    (folder / "README.md").write_text("# A model card, edited")
    assert fingerprint(folder) == fingerprint(moved)


def test_another_config_or_weights_give_another_fingerprint(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    seen = {fingerprint(folder)}
    (folder / "unet" / "config.json").write_text('{"sample_size": 96}')
    seen.add(fingerprint(folder))
    for offset, length in sampled_regions(LARGE):  # a byte in each sampled chunk
        poke(weights, offset + length // 2)
        seen.add(fingerprint(folder))
    with weights.open("r+b") as handle:  # the same bytes sampled, one more at the end
        handle.truncate(LARGE + 1)
    seen.add(fingerprint(folder))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "w.bin")
    seen.add(fingerprint(folder))
    assert len(seen) == 7, "each of the six changes gave a fingerprint of its own"


def test_a_large_file_is_sampled_not_read_whole(tmp_path: Path) -> None:
    gigabytes = 10 * 2**30
    regions = sampled_regions(gigabytes)
    assert sum(length for _, length in regions) == 3 * CHUNK
    assert [offset for offset, _ in regions] == [0, (gigabytes - CHUNK) // 2, gigabytes - CHUNK]
    assert sampled_regions(WHOLE) == [(0, WHOLE)], "small files are hashed whole"

    # The fingerprint reads those regions only: a byte between them goes unnoticed.
    folder = model_folder(tmp_path / "model")
    before = fingerprint(folder)
    poke(folder / "unet" / "diffusion_pytorch_model.safetensors", 2 * CHUNK)
    assert fingerprint(folder) == before


def test_the_launcher_fingerprints_each_model_input_by_the_field_naming_it(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    teacher = build_model(tmp_path / "teacher", seed=1)
    job = lcm_job(
        baseModel={"uri": str(tiny_model), "vaeUri": str(tiny_model / "vae")},
        lcm={"teacherModel": {"uri": str(teacher)}},
        data={"dataset": {"uri": str(write_captioned_images(tmp_path / "data", ("red",), 2))}},
        output={"uri": str(tmp_path / "out")},
    )
    spec = FineTuneJob.model_validate(job).spec.training_spec()
    fingerprints = prepare(spec, "tiny").model_fingerprints
    assert fingerprints == {
        "spec.baseModel.uri": fingerprint(tiny_model),
        "spec.baseModel.vaeUri": fingerprint(tiny_model / "vae"),
        "spec.lcm.teacherModel.uri": fingerprint(teacher),
    }
    assert len(set(fingerprints.values())) == 3
    layout = run_layout(spec, 1, fingerprints)
    assert {field: layout[field] for field in fingerprints} == {
        "spec.baseModel.uri": str(tiny_model),
        "spec.baseModel.vaeUri": str(tiny_model / "vae"),
        "spec.lcm.teacherModel.uri": str(teacher),
    }, "a refusal names the URI of the field"
