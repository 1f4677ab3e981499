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


def finetune_run(
    job: Path, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "FINETUNE_CACHE_DIR": str(job.parent / "cache"), **(env or {})}
    return subprocess.run(
        [str(FINETUNE), "run", str(job), "--nproc", str(nproc)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )


def train_log(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
