#!/usr/bin/env bash
# Torch-only GPU checks in one go (training step + numerics): JSON per run + one log under $OUT.
#
#   OUT=/tmp/train_step bash benchmarks/gpu/train_step.sh        # python3 on PATH holds torch + timm
#   PY=.venv/bin/python bash benchmarks/gpu/train_step.sh
#
# Expected ~4-5 min on one H100/H200 (each run: CUDA start-up, one fp32 FLOP-count step, the card's bf16 matmul
# rate, 5 warm-up + 20 timed steps per variant; each --compile run spends 1-2 min in inductor), at most ~8 min:
# every run is capped by `timeout`, so one stuck run does not sink the rest. Most important first:
#   1. ViT-S/16 reference vs ours + torch.compile       (the targets: >= 2.0x the reference, MFU >= 40%)
#   2. numerics: 50 steps in fp32 / TF32 / bf16 / fp16 + GradScaler from the same weights and crops
#   3. ViT-S/16 ours, eager                             (what compile adds)
#   4. ViT-S/16 reference without its host syncs        (how much of the ratio is loss.item() + clip syncs)
#   5. ViT-B/16 reference vs ours + torch.compile
# 2x224 + 10x96 crops, batch 64 per GPU, out_dim 65536 (the scripts' defaults). 6 files come back.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/train_step}
PY=${PY:-python3}
LOG="$OUT/train_step.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

run() {  # run NAME LIMIT_S ARGS...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: benchmarks/training/train_step.py $* (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$PY" benchmarks/training/train_step.py --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$LOG"

S=(--arch vit_small_patch16_224)
B=(--arch vit_base_patch16_224)
run vit_s_compile 170 "${S[@]}" --which both --compile
echo "=== numerics: benchmarks/gpu/numerics.py (limit 120s)" | tee -a "$LOG"
timeout 120 "$PY" benchmarks/gpu/numerics.py --json "$OUT/numerics.json" 2>&1 | tee -a "$LOG"
run vit_s_eager 60 "${S[@]}" --which ours
run vit_s_reference_nosync 45 "${S[@]}" --which reference --no-reference-syncs
run vit_b_compile 170 "${B[@]}" --which both --compile
echo "=== done after $SECONDS s" | tee -a "$LOG"
grep -h "^SUMMARY" "$LOG" || true
