"""The container images, checked without a Docker engine: what each Dockerfile copies
exists, its entrypoint resolves to a module that imports, the versions it pins are
the project's, it runs as a non-root user, and the operator needs no torch."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support import ROOT

OPERATOR = ROOT / "operator" / "Dockerfile"
TRAINER = ROOT / "trainer_image" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def pin(requirements: list[str], name: str) -> str:
    (found,) = [r for r in requirements if re.match(rf"{name}\s*==", r)]
    return found.split("==")[1]


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_every_copied_path_exists(dockerfile: Path) -> None:
    copies = [args.split() for kind, args in instructions(dockerfile) if kind == "COPY"]
    assert copies
    for *sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


@pytest.mark.parametrize(
    ("dockerfile", "command"), [(OPERATOR, "finetune-operator"), (TRAINER, "finetune")]
)
def test_the_entrypoint_is_a_project_command_that_imports(dockerfile: Path, command: str) -> None:
    (entrypoint,) = [args for kind, args in instructions(dockerfile) if kind == "ENTRYPOINT"]
    assert entrypoint == f'["{command}"]'
    module = PYPROJECT["project"]["scripts"][command].split(":")[0]
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_the_image_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = [args for kind, args in instructions(dockerfile) if kind == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")


def test_the_trainer_image_pins_the_projects_versions() -> None:
    args = dict(a.split("=", 1) for kind, a in instructions(TRAINER) if kind == "ARG" and "=" in a)
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in makefile
    assert f"deepspeed=={args['DEEPSPEED_VERSION']}" in makefile
    trainer = PYPROJECT["project"]["optional-dependencies"]["trainer"]
    assert pin(trainer, "deepspeed") == args["DEEPSPEED_VERSION"]
    torch = next(r for r in trainer if r.startswith("torch"))
    low, high = re.findall(r"[\d.]+", torch)
    version = tuple(int(p) for p in args["TORCH_VERSION"].split("."))
    assert tuple(int(p) for p in low.split(".")) <= version < tuple(int(p) for p in high.split("."))
    assert any("HF_HUB_OFFLINE=1" in a for kind, a in instructions(TRAINER) if kind == "ENV")


def test_the_operator_runs_without_torch() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]["operator"]
    assert not [r for r in extras if r.startswith(("torch", "deepspeed", "diffusers"))]
    # A module set to None cannot be imported: any torch import would fail here.
    code = "import sys; sys.modules['torch'] = None; import finetune_operator.handlers"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_cpu_trainer_image_is_one_build_arg_away() -> None:
    """`--build-arg DEVICE=cpu` picks a stage without CUDA whose torch comes from the
    CPU wheels, and the image carries what examples/cpu-quickstart.yaml trains on."""
    steps = instructions(TRAINER)
    stages: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for kind, args in steps:
        if kind == "FROM":
            current = args.split(" AS ")[-1] if " AS " in args else args
        stages.setdefault(current, []).append((kind, args))
    assert ("ARG", "DEVICE=cuda") in steps
    assert stages["base-cpu"][0] == ("FROM", "ubuntu:24.04 AS base-cpu")
    assert any("whl/cpu" in args for kind, args in stages["base-cpu"] if kind == "ENV")
    assert any("whl/cu" in args for kind, args in stages["base-cuda"] if kind == "ENV")
    final = stages["base-${DEVICE}"]
    assert any("FINETUNE_TORCH_INDEX" in args for kind, args in final if kind == "RUN")
    assert ("RUN", "python -m finetune.assets /opt/finetune/quickstart") in final

    example = (ROOT / "examples" / "cpu-quickstart.yaml").read_text()
    assert "gpusPerNode: 0" in example
    assert "uri: /opt/finetune/quickstart/model" in example
    assert "instanceImages: /opt/finetune/quickstart/images" in example


def test_the_cuda_trainer_image_carries_bitsandbytes_for_adamw8bit() -> None:
    """`training.optimizer: adamw8bit` needs bitsandbytes: the CUDA image installs the
    project's `gpu` extra with it; the CPU image, where it cannot run, does not."""
    steps = instructions(TRAINER)
    extras: dict[str, str] = {}
    stage = ""
    for kind, args in steps:
        if kind == "FROM":
            stage = args.split(" AS ")[-1]
        elif kind == "ENV" and "FINETUNE_EXTRAS=" in args:
            extras[stage] = args.split("FINETUNE_EXTRAS=")[1].split()[0]
    assert extras == {"base-cuda": "trainer,gpu", "base-cpu": "trainer"}
    assert any('pip install ".[${FINETUNE_EXTRAS}]"' in a for k, a in steps if k == "RUN")
    assert PYPROJECT["project"]["optional-dependencies"]["gpu"] == ["bitsandbytes==0.50.2"]
