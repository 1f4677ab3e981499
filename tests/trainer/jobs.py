"""Writing job files and running `finetune run` the way a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support import merge

FINETUNE = Path(sys.executable).parent / "finetune"
PROMPT = "a photo of sks disc"


def job_file(folder: Path, model: Path, images: Path, name: str = "tiny", **spec: Any) -> Path:
    base = {
        "method": "lora",
        "baseModel": {"uri": str(model)},
        "data": {
            "concepts": [{"instanceImages": str(images), "instancePrompt": PROMPT}],
            "resolution": 64,
        },
        "training": {"maxSteps": 6, "learningRate": 1e-3, "batchSize": 2},
        "checkpointing": {"everyNSteps": 3},
        "output": {"uri": str(folder / "out")},
    }
    document = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": merge(base, spec),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def prior_preservation_job(
    folder: Path, model: Path, images: Path, classes: str | None = None, **spec: Any
) -> Path:
    """A DreamBooth job on `images` with prior preservation: 2 class images of a disc,
    kept at `classes` (in the output without one); `spec` is merged over it."""
    concept = {
        "instanceImages": str(images),
        "instancePrompt": PROMPT,
        "classPrompt": "a photo of a disc",
        "classImages": {"count": 2, **({"uri": classes} if classes else {})},
    }
    own = {"data": {"concepts": [concept]}, "training": {"priorPreservation": True}}
    return job_file(folder, model, images, method="dreambooth", **merge(own, spec))


def finetune_run(
    job: Path,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 1200,
    expect: int | None = 0,
) -> subprocess.CompletedProcess[str]:
    """`finetune run JOB --nproc N` as a user types it, with its cache beside the job file.
    The run must end with exit code `expect` (any code with None); otherwise the test
    fails showing the end of what the run printed."""
    environment = {**os.environ, "FINETUNE_CACHE_DIR": str(job.parent / "cache"), **(env or {})}
    result = subprocess.run(
        [str(FINETUNE), "run", str(job), "--nproc", str(nproc)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )
    if expect is not None:
        assert result.returncode == expect, (
            f"exit code {result.returncode}, expected {expect}:\n{result.stderr[-3000:]}"
        )
    return result


def status_env(
    folder: Path, api_url: str, namespace: str = "team-a", token: str | None = None
) -> dict[str, str]:
    """The environment a pod of job `tiny` (`job_file`'s default name) in `namespace` gets,
    pointing `finetune run`'s status reports at the (emulated) API server `api_url` after
    every step. Its service account folder is made in `folder`, holding `token` if given."""
    account = folder / "serviceaccount"
    account.mkdir()
    if token is not None:
        (account / "token").write_text(token)
    return {
        "FINETUNE_JOB_NAME": "tiny",
        "FINETUNE_NAMESPACE": namespace,
        "FINETUNE_STATUS_API": api_url,
        "FINETUNE_STATUS_INTERVAL": "0",
        "FINETUNE_SERVICE_ACCOUNT_DIR": str(account),
    }


def refused(job: Path, *fragments: str, code: int = 2, **options: Any) -> str:
    """Run `job`, which must be refused with `code` and a last line naming every fragment
    (the field, the file, the reason); that line."""
    message = finetune_run(job, expect=code, **options).stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in message, message
    return message


def train_log(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def assert_every_adapter_loaded(pipeline: Any, weights: dict[str, Any]) -> None:
    """After `load_lora_weights`, the pipeline's adapters hold exactly the file's tensors:
    a key the loader did not recognise would be missing or left at its initial value."""
    import torch
    from peft.utils import get_peft_model_state_dict

    loaded = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, part, None)
        if getattr(module, "peft_config", None):
            (adapter,) = module.peft_config
            state = get_peft_model_state_dict(module, adapter_name=adapter)
            loaded.update({f"{part}.{key}": value for key, value in state.items()})
    assert sorted(loaded) == sorted(weights), "the loader dropped or renamed adapters"
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), msg=key)


def render(
    pipeline: Any, prompt: str = PROMPT, steps: int = 4, seed: int = 1234, **options: Any
) -> Any:
    """64x64 images as a numpy array, from a fixed seed: what the pipeline makes of `prompt`."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(seed)
    return np.asarray(
        pipeline(
            prompt,
            num_inference_steps=steps,
            height=64,
            width=64,
            generator=generator,
            output_type="np",
            **options,
        ).images
    )


def _tensorboard(logs: Path) -> tuple[Any, str]:
    """TensorBoard's reader over every event file of `logs` (a resumed run's purges
    applied), and the one run it finds there."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    board = EventMultiplexer().AddRunsFromDirectory(str(logs))
    board.Reload()
    (run,) = board.Runs()
    return board, run


def tensorboard_images(logs: Path, tag: str) -> list[int]:
    """The steps of the images TensorBoard shows under `tag` for `logs`."""
    board, run = _tensorboard(logs)
    return [e.step for e in board.Images(run, tag)]


def tensorboard_scalars(logs: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for `logs` as (step, value) by tag."""
    board, run = _tensorboard(logs)
    return {
        tag: [(e.step, e.value) for e in board.Scalars(run, tag)]
        for tag in board.Runs()[run]["scalars"]
    }
