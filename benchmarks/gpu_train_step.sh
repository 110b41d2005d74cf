#!/usr/bin/env bash
# Issue 7's training-step figures on one GPU in one go: JSON per run + one log under $OUT.
#
#   OUT=/tmp/train_step bash benchmarks/gpu_train_step.sh            # python3 on PATH holds torch + timm
#   PY=.venv/bin/python bash benchmarks/gpu_train_step.sh
#
# Expected ~5-6 min on one H100 (each run: CUDA start-up, one fp32 FLOP-count step, 5 warm-up + 20 timed
# steps per variant; each --compile run spends 1-2 min in inductor), at most ~9 min: every run is capped
# by `timeout`, so one stuck run does not sink the rest. Most important first:
#   1. ViT-S/16 reference vs ours + torch.compile       (the issue's target: >= 2.0x, MFU >= 40%)
#   2. ViT-S/16 reference vs ours, eager                (what compile adds; the reference a second time)
#   3. ViT-S/16 reference without its host syncs        (how much of the ratio is loss.item() + clip syncs)
#   4. ViT-B/16 reference vs ours + torch.compile
#   5. ViT-B/16 ours, eager
# 2x224 + 10x96 crops, batch 64 per GPU, out_dim 65536 (the script's defaults). 6 files come back.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/train_step}
PY=${PY:-python3}
LOG="$OUT/gpu_train_step.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

run() {  # run NAME LIMIT_S ARGS...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: benchmarks/train_step.py $* (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$PY" benchmarks/train_step.py --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$LOG"

S=(--arch vit_small_patch16_224)
B=(--arch vit_base_patch16_224)
run vit_s_compile 180 "${S[@]}" --which both --compile
run vit_s_eager 75 "${S[@]}" --which both
run vit_s_reference_nosync 50 "${S[@]}" --which reference --no-reference-syncs
run vit_b_compile 180 "${B[@]}" --which both --compile
run vit_b_eager 60 "${B[@]}" --which ours
echo "=== done after $SECONDS s" | tee -a "$LOG"
