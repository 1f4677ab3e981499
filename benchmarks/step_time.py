"""Our trainer's step time against a bare diffusers-style loop, in the same run.

    python benchmarks/step_time.py --size tiny --method lora --steps 40 --out /tmp/bench

Both train the same randomly initialised model (`tiny` for a CPU, `sd15` for the real
SD 1.5 architecture on a GPU) on the same images with the same batch size, both with
VAE latents and text embeddings cached: the baseline is the plain loop of the diffusers
example scripts (one process, torch AdamW, no DeepSpeed); ours is `finetune run` with
one process under DeepSpeed ZeRO-2. Reported: median step time after warm-up, the
ratio (goal: at most 1.05), images per second, and peak memory (GPU memory on a GPU,
resident set size on a CPU), as JSON on stdout and in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

WARMUP_STEPS = 5
PROMPT = "a photo of sks disc"


def bare_loop(
    model: Path, images: Path, method: str, steps: int, batch: int, resolution: int, bf16: bool
) -> dict[str, Any]:
    """The diffusers example scripts' loop, reduced to its work."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device, dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device, dtype)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
    unet.to(device, dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    with torch.no_grad():
        ids = tokenizer(
            [PROMPT],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        text = text_encoder(ids.to(device))[0]
        latent_dists = []
        for path in sorted(images.glob("*.png")):
            pixels = torch.tensor(
                list(Image.open(path).convert("RGB").resize((resolution, resolution)).getdata())
            )
            pixels = pixels.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1
            latent_dists.append(vae.encode(pixels[None].to(device, dtype)).latent_dist)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        chosen = [latent_dists[(step * batch + i) % len(latent_dists)] for i in range(batch)]
        latents = torch.cat([d.sample() for d in chosen]).float() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=dtype, enabled=bf16):
            prediction = unet(noisy.to(dtype), timesteps, text.expand(batch, -1, -1)).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # wait for the step, as ours does when it logs the loss
        times.append(time.perf_counter() - started)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"step_seconds": statistics.median(times[WARMUP_STEPS:]), "peak_bytes": peak}


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
) -> dict[str, Any]:
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{method}"},
        "spec": {
            "method": method,
            "baseModel": {"uri": str(model)},
            "data": {
                "concepts": [{"instanceImages": str(images), "instancePrompt": PROMPT}],
                "resolution": resolution,
                "centerCrop": True,
            },
            "training": {
                "maxSteps": steps,
                "batchSize": batch,
                "learningRate": 1e-4,
                "mixedPrecision": "bf16" if bf16 else "no",
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
    return {"step_seconds": statistics.median(step_seconds), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--method", choices=["lora", "dreambooth"], default="lora")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--deepspeed", type=json.loads, default={}, help="the job's spec.deepspeed, as JSON"
    )
    parser.add_argument("--baseline-in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model, images = out / f"model-{args.size}", out / f"images-{args.resolution}"

    if args.baseline_in_process:
        print(
            json.dumps(
                bare_loop(
                    model, images, args.method, args.steps, args.batch, args.resolution, args.bf16
                )
            )
        )
        return

    from finetune.assets import build_model, write_images

    if not (model / "model_index.json").exists():
        build_model(model, args.size)
    if not images.exists():
        write_images(images, 8, resolution=args.resolution)
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
    )
    results = {
        "size": args.size,
        "method": args.method,
        "batch": args.batch,
        "resolution": args.resolution,
        "bf16": args.bf16,
        "deepspeed": args.deepspeed,
        "baseline": {**baseline, "images_per_second": args.batch / baseline["step_seconds"]},
        "ours": {**mine, "images_per_second": args.batch / mine["step_seconds"]},
        "step_time_ratio": mine["step_seconds"] / baseline["step_seconds"],
        "peak_memory_ratio": mine["peak_bytes"] / baseline["peak_bytes"],
    }
    tag = (
        ""
        if not args.deepspeed
        else "-" + "-".join(f"{k}{v}" for k, v in args.deepspeed.items() if not isinstance(v, dict))
    )
    (out / f"results-{args.size}-{args.method}{tag}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
