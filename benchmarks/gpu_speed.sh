#!/usr/bin/env bash
# The trainer-speed check on a GPU machine (../shared/gpu/README.md): every method at the
# SD 1.5 architecture (random weights), 512 px, batch 4, bf16, with the default settings,
# then LoRA and DreamBooth with `training.compile`. Each run measures its own bare-loop
# baseline; its JSON is copied under $OUT as soon as it is written, so a time-out still
# leaves every figure measured so far. Models and outputs stay in /tmp/bench.
#
#   bash .whl/install-on-device.sh && \
#   PYTHONPATH=/tmp/site:trainer_image/src:operator/src bash benchmarks/gpu_speed.sh
set -u
: "${OUT:?OUT names the folder results go to}"
WORK=${WORK:-/tmp/bench}
EACH=${EACH:-240}  # seconds one comparison may take

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
compare() {
    local name=$1; shift
    echo "== $name"
    timeout "$EACH" python3 benchmarks/step_time.py --size sd15 --steps 15 --batch 4 \
        --resolution 512 --bf16 --out "$WORK" "$@" >"$OUT/$name.log" 2>&1
    echo "exit $?" >>"$OUT/$name.log"
    cp "$WORK"/results-*.json "$OUT"/ 2>/dev/null
    tail -n 3 "$OUT/$name.log"
}
for method in dreambooth lora customDiffusion lcm lcmLora; do
    compare "$method" --method "$method"
done
compare lora-compile --method lora --training '{"compile": true}'
compare dreambooth-compile --method dreambooth --training '{"compile": true}'
