#!/usr/bin/env bash
# The trainer-speed check on a GPU machine (../shared/gpu/README.md), in about 9 minutes
# (BUDGET seconds; a comparison that would start with under a minute left is skipped and
# says so). Each comparison measures its own bare-loop baseline in the same run; its JSON
# is copied under $OUT as soon as it is written, so a time-out keeps what was measured.
#
#   sdxl: Stable Diffusion XL base architecture (random weights), 1024 px, bf16, 15 steps,
#         against `train_dreambooth_lora_sdxl.py`'s loop: LoRA at batch 2, DreamBooth
#         (the whole UNet) at batch 1, gradient checkpointing off in both. DreamBooth's
#         fp32 weights, gradients and AdamW state alone take 41 GB; batch 1 keeps it
#         within an 80 GB H100 as well as an H200, and without checkpointing each step
#         is pure work, so our per-step overhead shows rather than being diluted.
#   sd:   SD 1.5 architecture, 512 px, batch 4, bf16: every method with the default
#         settings, then LoRA and DreamBooth with `training.compile`, as time allows.
#
# From a clone on a GPU machine (`make setup` there installs torch's CUDA build):
#   mkdir -p gpu-results && PATH=$PWD/.venv/bin:$PATH OUT=$PWD/gpu-results bash benchmarks/gpu_speed.sh
# On a lent device machine with the session's prepared wheels in .whl/ (the workspace's
# shared/gpu/README.md; not in the repository):
#   bash .whl/install-on-device.sh && \
#   PYTHONPATH=/tmp/site:trainer_image/src:operator/src bash benchmarks/gpu_speed.sh
#   # one part only: PARTS=sdxl (or PARTS=sd) before `bash`
set -u
: "${OUT:?OUT names the folder results go to}"
WORK=${WORK:-/tmp/bench}
BUDGET=${BUDGET:-540}  # seconds the whole script may take
PARTS=${PARTS:-sdxl sd}
START=$SECONDS
mkdir -p "$WORK"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# NAME MOST COMMAND...: run COMMAND for at most MOST seconds, or what is left of BUDGET.
within_budget() {
    local name=$1 most=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((most < left ? most : left))
    if ((limit < 60)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee "$OUT/$name.log"
        return 1
    fi
    echo "== $name (at most ${limit}s, $((SECONDS - START))s in)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "exit $? after $((SECONDS - START))s in all; disk: $(df -h --output=avail "$WORK" | tail -1)" >>"$OUT/$name.log"
    tail -n 3 "$OUT/$name.log"
}

# NAME MOST ARGS...: one step_time.py comparison; our outputs go once read (an SDXL
# DreamBooth checkpoint is about 31 GB, its pipeline 14 GB).
compare() {
    local name=$1 most=$2
    shift 2
    within_budget "$name" "$most" python3 benchmarks/step_time.py --out "$WORK" "$@"
    cp "$WORK"/results-*.json "$OUT"/ 2>/dev/null
    rm -rf "$WORK"/ours-*
}

if [[ " $PARTS " == *" sdxl "* ]]; then
    # Built once, on the GPU (3.5B parameters, 14 GB in fp32), before any clock runs.
    within_budget sdxl-build 120 python3 -c "from finetune.assets import build_sdxl_model as b; b('$WORK/model-sdxl-base', size='base')"
    sdxl=(--family sdxl --size base --steps 15 --resolution 1024 --bf16)
    compare sdxl-lora 180 "${sdxl[@]}" --method lora --batch 2
    compare sdxl-dreambooth 240 "${sdxl[@]}" --method dreambooth --batch 1
    rm -rf "$WORK/model-sdxl-base"
fi
if [[ " $PARTS " == *" sd "* ]]; then
    sd=(--size sd15 --steps 15 --batch 4 --resolution 512 --bf16)
    for method in lora dreambooth customDiffusion lcm lcmLora; do
        compare "$method" 120 "${sd[@]}" --method "$method"
    done
    compare lora-compile 150 "${sd[@]}" --method lora --training '{"compile": true}'
    compare dreambooth-compile 150 "${sd[@]}" --method dreambooth --training '{"compile": true}'
fi
echo "done in $((SECONDS - START))s"
