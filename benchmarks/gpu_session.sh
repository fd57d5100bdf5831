#!/usr/bin/env bash
# Issue 8's GPU table in one device call: benchmarks/sd_speed.py at SD-1.4 size in the settings
# docs/performance.md ("What remains") asks for, each under its own time limit (seconds, first argument of
# `setting`; 530 s in all with the gradient check, plus up to 10 s each to kill, under the 600 s per call), logs and JSON under $OUT, each table printed
# as soon as it is measured. Compiling takes minutes, so the compiled settings come last: a call cut short
# still returns the eager tables.
#
# On the device (diffusers is missing there; carry it as wheels, see docs/performance.md):
#   bash benchmarks/gpu_session.sh                 # with .whl carried
# Here, the same code on tiny-random-sd (a check of the script before spending device time):
#   SMALL=1 OUT=/tmp/gpu_session PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src HF_HUB_OFFLINE=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site:src
fi
size=() device=(--device cuda)
if [ "${SMALL:-0}" = 1 ]; then
    size=(--small --device cpu --warmup 1 --extra-steps 1) device=(--device cpu)
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, diffusers, transformers, peft, accelerate, huggingface_hub as h
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'accelerate', accelerate.__version__, 'huggingface_hub', h.__version__)"; } | tee "$OUT/versions.txt"
# In seconds, not after minutes: darkminer's SD path imports on this machine's packages (transformers'
# masking API and peft change between versions; the image's are not the project's pins).
"$PYTHON" -c "import darkminer.models.stable_diffusion, darkminer.models.adapters, darkminer.parallel.distributed" \
    || { echo "darkminer does not import here: carry the wheels docs/performance.md names"; exit 1; }

setting() {  # LIMIT NAME ARGS...: one sd_speed run, then its table
    local limit=$1 name=$2; shift 2
    local started=$SECONDS
    timeout -k 10 "$limit" "$PYTHON" benchmarks/sd_speed.py "${size[@]}" "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "== $name: rc $? in $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    grep -E '^\||Dark Miner erase estimate|Error|error:' "$OUT/$name.log" | tail -16
}

# Training arithmetic: float32 weights, bf16 autocast; every section (UNet, Dark Miner's steps, attack, ESD).
setting 150 fp32w_bf16 --weights fp32 --precision bf16 --repeats 3
# Does inductor keep the LoRA gradients on the GPU? (On the CPU it did not: docs/performance.md.)
started=$SECONDS
timeout -k 10 120 "$PYTHON" benchmarks/compile_gradients.py --model tiny-random-sd "${device[@]}" \
    --settings sdpa,classic --out "$OUT/compile_gradients.json" > "$OUT/compile_gradients.log" 2>&1
echo "== compile_gradients: rc $? in $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
grep -E '^\||^\{' "$OUT/compile_gradients.log"
# Generation and evaluation: bf16 weights, the UNet rows only; then the same compiled.
setting 40 bf16w_unet --weights bf16 --precision bf16 --channels-last --sections unet --repeats 3
setting 110 bf16w_unet_compiled --weights bf16 --precision bf16 --channels-last --sections unet --repeats 3 --compile default
# Dark Miner's steps compiled (float32 weights, bf16 autocast): the erase estimate with torch.compile.
setting 110 fp32w_bf16_darkminer_compiled --weights fp32 --precision bf16 --sections darkminer --repeats 3 --compile default
