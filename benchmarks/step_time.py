"""Our trainer's step time against a bare diffusers-style loop, in the same run.

    python benchmarks/step_time.py --size tiny --method lora --steps 40 --out /tmp/bench

For each method (`--method`: lora, dreambooth, customDiffusion, lcm, lcmLora) both
train the same randomly initialised model (`tiny` for a CPU, `sd15` for the real SD 1.5
architecture on a GPU; with `--family sdxl`, lora and dreambooth on Stable Diffusion XL:
`tiny`, or `base`, SDXL base 1.0's architecture, 3.5B parameters) on the same images
with the same batch size: the baseline is the
loop of that method's diffusers example script reduced to its work (`baselines.py`: one
process, torch AdamW, no DeepSpeed); ours is `finetune run` with one process under
DeepSpeed. Where preprocessing is deterministic (lora, dreambooth) both cache VAE latents
and text embeddings; Custom Diffusion's augmentation and LCM's dataset encode every step
in both. Reported: median step time after warm-up, the ratio (goal: at most 1.05),
images per second, and peak memory (GPU memory on a GPU, resident set size on a CPU), as
JSON on stdout and in OUT/results-MODEL-METHOD.json (MODEL: the size, or sdxl-SIZE).

Model FLOPs utilisation (MFU): the FLOPs of one baseline step, counted with
`torch.utils.flop_counter.FlopCounterMode` (the same work as one of ours), divided by
each side's step time and by the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`, or
`--peak-tflops`); on a CPU only the achieved TFLOP/s are reported. `--training` adds
settings to our job's `spec.training` (e.g. `{"compile": true}`); the first step of ours,
which compiles, is reported apart as `first_step_seconds`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from baseline_parts import WARMUP_STEPS, Bench  # benchmarks/ is on the path as a script runs
from baselines import (
    CAPTION,
    CUSTOM_PROMPT,
    INITIALIZER_TOKEN,
    MODIFIER_TOKEN,
    PROMPT,
    SDXL_METHODS,
    run,
)

METHODS = ("lora", "dreambooth", "customDiffusion", "lcm", "lcmLora")
SIZES = {"sd": ("tiny", "sd15"), "sdxl": ("tiny", "base")}
# Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), in TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device), None)


def utilisation(flops: float, seconds: float, peak: float | None) -> dict[str, Any]:
    achieved = flops / seconds / 1e12
    return {"achieved_tflops": achieved, "mfu": achieved / peak if peak else None}


def method_spec(method: str, model: Path, images: Path) -> dict[str, Any]:
    """The job's data (and method settings) that match the baseline's loop."""
    if method in ("lcm", "lcmLora"):
        return {
            "data": {"dataset": {"uri": str(images)}},
            "lcm": {"teacherModel": {"uri": str(model)}},
        }
    prompt = CUSTOM_PROMPT if method == "customDiffusion" else PROMPT
    spec: dict[str, Any] = {
        "data": {"concepts": [{"instanceImages": str(images), "instancePrompt": prompt}]}
    }
    if method == "customDiffusion":
        spec["customDiffusion"] = {
            "modifierTokens": [MODIFIER_TOKEN],
            "initializerTokens": [INITIALIZER_TOKEN],
        }
    return spec


def ours(
    model: Path,
    images: Path,
    method: str,
    steps: int,
    batch: int,
    resolution: int,
    bf16: bool,
    out: Path,
    deepspeed: dict[str, Any],
    training: dict[str, Any],
) -> dict[str, Any]:
    spec = method_spec(method, model, images)
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{method.lower()}"},
        "spec": {
            **spec,
            "method": method,
            "baseModel": {"uri": str(model)},
            "data": {**spec["data"], "resolution": resolution, "centerCrop": True},
            "training": {
                "maxSteps": steps,
                "batchSize": batch,
                "learningRate": 1e-4,
                "mixedPrecision": "bf16" if bf16 else "no",
                **training,
            },
            "checkpointing": {"everyNSteps": steps},
            "deepspeed": deepspeed,
            "output": {"uri": str(out / f"ours-{method}")},
        },
    }
    shutil.rmtree(out / f"ours-{method}", ignore_errors=True)  # never resume an earlier run
    job_file = out / f"ours-{method}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    command = [sys.executable, "-m", "finetune.cli", "run", str(job_file), "--nproc", "1"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    log = [
        json.loads(line)
        for line in (out / f"ours-{method}" / "train_log.jsonl").read_text().splitlines()
    ]
    step_seconds = [entry["stepSeconds"] for entry in log[WARMUP_STEPS:]]
    peak = max(entry.get("gpuMemoryPeakBytes", entry["rssPeakBytes"]) for entry in log)
    return {
        "step_seconds": statistics.median(step_seconds),
        "first_step_seconds": log[0]["stepSeconds"],
        "peak_bytes": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=list(SIZES), default="sd")
    parser.add_argument(
        "--size", choices=sorted({s for sizes in SIZES.values() for s in sizes}), default="tiny"
    )
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--deepspeed", type=json.loads, default={}, help="the job's spec.deepspeed, as JSON"
    )
    parser.add_argument(
        "--training", type=json.loads, default={}, help="added to our spec.training, as JSON"
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--baseline-in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.size not in SIZES[args.family]:
        parser.error(f"--size for --family {args.family}: one of {', '.join(SIZES[args.family])}")
    if args.family == "sdxl" and args.method not in SDXL_METHODS:
        parser.error(f"--method for --family sdxl: one of {', '.join(SDXL_METHODS)}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    name = args.size if args.family == "sd" else f"sdxl-{args.size}"
    # Captioned images: the concept methods ignore the captions, LCM's dataset reads them.
    model, images = out / f"model-{name}", out / f"captioned-{args.resolution}"

    if args.baseline_in_process:
        bench = Bench(
            model, images, args.steps, args.batch, args.resolution, args.bf16, args.family
        )
        print(json.dumps(run(args.method, bench)))
        return

    from finetune.assets import build_model, build_sdxl_model, write_images

    if not (model / "model_index.json").exists():
        if args.family == "sdxl":
            build_sdxl_model(model, size=args.size)
        else:
            build_model(model, args.size)
    if not images.exists():
        write_images(images, 8, resolution=args.resolution, caption=CAPTION)
    # The baseline runs in a process of its own, so its peak memory is its own.
    baseline_run = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--baseline-in-process"],
        check=True,
        capture_output=True,
        text=True,
    )
    baseline = json.loads(baseline_run.stdout.strip().splitlines()[-1])
    mine = ours(
        model,
        images,
        args.method,
        args.steps,
        args.batch,
        args.resolution,
        args.bf16,
        out,
        args.deepspeed,
        args.training,
    )
    peak = peak_tflops(baseline["device"], args.peak_tflops)
    flops = baseline["flops_per_step"]
    results = {
        "family": args.family,
        "size": args.size,
        "method": args.method,
        "batch": args.batch,
        "resolution": args.resolution,
        "bf16": args.bf16,
        "deepspeed": args.deepspeed,
        "training": args.training,
        "peak_bf16_tflops": peak,
        "baseline": {
            **baseline,
            "images_per_second": args.batch / baseline["step_seconds"],
            **utilisation(flops, baseline["step_seconds"], peak),
        },
        "ours": {
            **mine,
            "images_per_second": args.batch / mine["step_seconds"],
            **utilisation(flops, mine["step_seconds"], peak),
        },
        "step_time_ratio": mine["step_seconds"] / baseline["step_seconds"],
        "peak_memory_ratio": mine["peak_bytes"] / baseline["peak_bytes"],
    }
    settings = {**args.deepspeed, **args.training}
    tag = "".join(f"-{k}{v}" for k, v in settings.items() if not isinstance(v, dict))
    (out / f"results-{name}-{args.method}{tag}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
