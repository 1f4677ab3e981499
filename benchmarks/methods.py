"""Each training method end to end through `finetune run`: images per second and peak memory.

    python benchmarks/methods.py --size sd15 --steps 20 --out /tmp/methods   # a GPU
    python benchmarks/methods.py --size tiny --steps 20 --out /tmp/methods   # a CPU

Every method trains the same randomly initialised model (`sd15`: the real SD 1.5
architecture, so speed and memory are honest without downloading weights) with
one process under DeepSpeed ZeRO-2, bf16 on a GPU. Custom Diffusion trains two
concepts with prior preservation (class images given, so none are generated);
lcm reads webdataset shards and lcmLora a captioned folder. Reported per method:
median images per second after warm-up (instance images: Custom Diffusion
trains as many class images beside them), peak GPU memory (resident set size on a
CPU) and the files written; JSON on stdout and in OUT/results-methods-SIZE.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

WARMUP_STEPS = 5
METHODS = ("lora", "dreambooth", "customDiffusion", "lcm", "lcmLora")


def spec_for(method: str, data: dict[str, Path], model: Path, resolution: int) -> dict[str, Any]:
    concept = {"instanceImages": str(data["discs"]), "instancePrompt": "a photo of sks disc"}
    if method in ("lora", "dreambooth"):
        return {"data": {"concepts": [concept], "resolution": resolution}}
    if method == "customDiffusion":
        concepts = [
            {
                "instanceImages": str(data[name]),
                "instancePrompt": f"a photo of {token} disc",
                "classPrompt": "a photo of a disc",
                "classImages": {"uri": str(data["classes"]), "count": 4},
            }
            for name, token in (("discs", "<new1>"), ("others", "<new2>"))
        ]
        return {
            "data": {"concepts": concepts, "resolution": resolution},
            "customDiffusion": {
                "modifierTokens": ["<new1>", "<new2>"],
                "initializerTokens": ["a", "b"],
            },
            "training": {"priorPreservation": True},
        }
    dataset = data["shards"] if method == "lcm" else data["captioned"]
    return {
        "data": {"dataset": {"uri": str(dataset)}, "resolution": resolution},
        "lcm": {"teacherModel": {"uri": str(model)}},
    }


def run_method(
    method: str,
    model: Path,
    data: dict[str, Path],
    steps: int,
    batch: int,
    resolution: int,
    bf16: bool,
    out: Path,
) -> dict[str, Any]:
    spec = spec_for(method, data, model, resolution)
    spec["method"] = method
    spec["baseModel"] = {"uri": str(model)}
    spec["training"] = {
        **spec.get("training", {}),
        "maxSteps": steps,
        "batchSize": batch,
        "mixedPrecision": "bf16" if bf16 else "no",
    }
    spec["checkpointing"] = {"everyNSteps": steps}
    spec["output"] = {"uri": str(out / method)}
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{method.lower()}"},
        "spec": spec,
    }
    shutil.rmtree(out / method, ignore_errors=True)  # never resume an earlier run
    job_file = out / f"{method}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    started = time.perf_counter()
    command = [sys.executable, "-m", "finetune.cli", "run", str(job_file), "--nproc", "1"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"method": method, "failed": done.returncode, "stderr": done.stderr[-3000:]}
    log = [json.loads(line) for line in (out / method / "train_log.jsonl").read_text().splitlines()]
    return {
        "method": method,
        "steps": len(log),
        "images_per_second": statistics.median(e["imagesPerSecond"] for e in log[WARMUP_STEPS:]),
        "peak_gpu_bytes": max(e.get("gpuMemoryPeakBytes", 0) for e in log),
        "peak_rss_bytes": max(e["rssPeakBytes"] for e in log),
        "first_loss": log[0]["loss"],
        "last_loss": log[-1]["loss"],
        "wall_seconds": wall,
        "outputs": sorted(
            p.name for p in (out / method).iterdir() if p.name not in ("checkpoints", ".run")
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from finetune.assets import build_model, write_images, write_shards

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    resolution = 512 if args.size == "sd15" else 64
    model = build_model(out / f"model-{args.size}", args.size)
    data = {
        "discs": write_images(out / "discs", 8, resolution, seed=1),
        "others": write_images(out / "others", 8, resolution, seed=2),
        "classes": write_images(out / "classes", 4, resolution, seed=3),
        "captioned": write_images(out / "captioned", 32, resolution, seed=4, caption="a red disc"),
    }
    data["shards"] = write_shards(data["captioned"], out / "shards", per_shard=8)
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    results = {"device": device, "size": args.size, "resolution": resolution, "methods": []}
    for method in args.methods:
        result = run_method(method, model, data, args.steps, args.batch, resolution, gpu, out)
        print(json.dumps(result), flush=True)
        results["methods"].append(result)
        (out / f"results-methods-{args.size}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
