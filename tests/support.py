"""Small helpers the tests share: job documents and paths of the repository."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD_PATH = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
CHART_CRD_PATH = ROOT / "charts" / "finetune-operator" / "crds" / "finetune.dev_finetunejobs.yaml"
README = ROOT / "README.md"


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `changes` into a copy of `base`; a value of None deletes the key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lora_job(**spec_changes: Any) -> dict[str, Any]:
    """A minimal valid LoRA job; keyword arguments are merged into `spec`."""
    job: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "dog-lora"},
        "spec": {
            "method": "lora",
            "baseModel": {"uri": "hf://org/model@v1"},
            "data": {
                "concepts": [{"instanceImages": "./dog", "instancePrompt": "a photo of sks dog"}]
            },
            "output": {"uri": "s3://bucket/out"},
        },
    }
    job["spec"] = merge(job["spec"], spec_changes)
    return job


def lcm_job(**spec_changes: Any) -> dict[str, Any]:
    base = lora_job(
        method="lcmLora",
        data={"concepts": [], "dataset": {"uri": "s3://data/shards/"}},
        lcm={"teacherModel": {"uri": "hf://org/teacher"}},
    )
    base["spec"] = merge(base["spec"], spec_changes)
    return base
