"""Background checkpoint uploads: what they cost a training step, and how fast they go.

    python benchmarks/checkpoint_upload.py --method dreambooth --steps 40 --every 5 --out /tmp/bup

1. Step time: the same job through `finetune run` (one process, DeepSpeed ZeRO-2) with a
   local output (checkpoints written locally only), before and after the same job with
   an `s3://` output
   (the same checkpoints, then uploaded in the background to moto's S3 server on
   loopback, served from this process). Reported: the median step time after warm-up
   and the wall time of the timed steps (saves included), and their ratios to the mean
   of the two runs without upload (goal: at most 1.05).
2. Upload throughput: one file of `--mib` random MiB put by our store (tuned
   TransferConfig, retries) and by a plain boto3 `upload_file` with boto3's defaults,
   alternately, `--repeats` times each; median MiB/s of each and the ratio.

JSON on stdout and in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

WARMUP_STEPS = 5
PROMPT = "a photo of sks disc"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def moto_server() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in a process of its own at the lowest CPU priority: on one
    machine it stands for a store elsewhere, so it only gets what training leaves."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            "nice",
            "-n",
            "19",
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server, endpoint
        time.sleep(0.1)
    raise RuntimeError("moto's S3 server did not start")


def train(
    args: argparse.Namespace, model: Path, images: Path, output: str, endpoint: str
) -> dict[str, Any]:
    """One `finetune run`; its step times from the training log."""
    out: Path = args.out
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench-upload"},
        "spec": {
            "method": args.method,
            "baseModel": {"uri": str(model)},
            "data": {
                "concepts": [{"instanceImages": str(images), "instancePrompt": PROMPT}],
                "resolution": 64,
            },
            "training": {"maxSteps": args.steps, "batchSize": 2, "learningRate": 1e-4},
            "checkpointing": {"everyNSteps": args.every, "keepLast": 2},
            "output": {"uri": output, "s3EndpointUrl": endpoint},
        },
    }
    cache = out / "cache"
    shutil.rmtree(cache / "runs", ignore_errors=True)  # never resume an earlier run
    if not output.startswith("s3://"):
        shutil.rmtree(output, ignore_errors=True)
    job_file = out / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, **CREDENTIALS, "FINETUNE_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "finetune.cli", "run", str(job_file), "--nproc", "1"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    folder = next(cache.glob("runs/*")) if output.startswith("s3://") else Path(output)
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    timed = log[WARMUP_STEPS:]
    return {
        "median_step_seconds": statistics.median(e["stepSeconds"] for e in timed),
        "wall_seconds": timed[-1]["time"] - log[WARMUP_STEPS - 1]["time"],
        "checkpoint_bytes": sum(
            p.stat().st_size for p in (folder / "checkpoints").rglob("*") if p.is_file()
        ),
    }


def throughput(args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    import boto3

    from finetune.trainer.storage.s3 import S3Settings
    from finetune.trainer.storage.store import open_store

    path = args.out / "blob.bin"
    with path.open("wb") as handle:
        for _ in range(args.mib):
            handle.write(os.urandom(1 << 20))
    plain = boto3.client("s3", endpoint_url=endpoint)
    plain.create_bucket(Bucket="throughput")
    ours = open_store("s3://throughput/ours", S3Settings(endpoint))
    seconds: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        ours.put_file(path, "blob.bin")
        seconds["ours"].append(time.perf_counter() - started)
        started = time.perf_counter()
        plain.upload_file(str(path), "throughput", "plain/blob.bin")
        seconds["plain"].append(time.perf_counter() - started)
    path.unlink()
    mib_s = {name: args.mib / statistics.median(times) for name, times in seconds.items()}
    return {
        "mib": args.mib,
        "ours_mib_per_s": mib_s["ours"],
        "plain_mib_per_s": mib_s["plain"],
        "ratio": mib_s["ours"] / mib_s["plain"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=["lora", "dreambooth"], default="dreambooth")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    parser.add_argument("--mib", type=int, default=256, help="file size for the throughput")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(CREDENTIALS)

    from finetune.assets import build_model, write_images

    model, images = args.out / "model-tiny", args.out / "images-64"
    if not (model / "model_index.json").exists():
        build_model(model, "tiny")
    if not images.exists():
        write_images(images, 8, resolution=64)

    server, endpoint = moto_server()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        # Without, with, without again: the baseline brackets the measured run, so a
        # drift of the machine over the minutes shows instead of counting as the cost.
        before = train(args, model, images, str(args.out / "local"), endpoint)
        s3 = train(args, model, images, "s3://bench/run", endpoint)
        after = train(args, model, images, str(args.out / "local"), endpoint)
        local = {key: (before[key] + after[key]) / 2 for key in before}
        results = {
            "method": args.method,
            "steps": args.steps,
            "every": args.every,
            "without_upload": {"before": before, "after": after},
            "with_background_upload": s3,
            "step_time_ratio": s3["median_step_seconds"] / local["median_step_seconds"],
            "wall_time_ratio": s3["wall_seconds"] / local["wall_seconds"],
            "throughput": throughput(args, endpoint),
        }
    finally:
        server.terminate()
        server.wait()
    text = json.dumps(results, indent=1)
    (args.out / "results.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
