#!/usr/bin/env bash
# Recipe probes on one GPU machine, side by side: benchmarks/training/recipe_probe.py with --device cuda, each
# probe with its own augmentation processes (the machine's cores shared between them), logs and JSON under $OUT.
# On a 2-core CPU a probe of the imagenette preset takes ~2.4 min per Imagewoof epoch; here a few seconds, so the
# questions the 30-minute CPU budget cannot reach get an answer: does the recipe keep learning over a longer
# schedule, what does a small ViT reach after the same epochs, do larger crops help.
#
#   OUT=/tmp/probes DATA=/path/to/imagewoof2-128 bash benchmarks/gpu/probes.sh
#
# Ray (which pipeline.data imports) comes from tools/gpu-stage/stage.sh when python3 lacks it (from .stage, or
# from an earlier call's unpack on the same machine). LIMIT: seconds per probe.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu/probes}
DATA=${DATA:?DATA must name a webdataset root with train and val splits}
LIMIT=${LIMIT:-420}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import ray" 2>/dev/null; then
    # shellcheck source=tools/gpu-stage/stage.sh
    source tools/gpu-stage/stage.sh > "$OUT/stage.log" 2>&1 || { cat "$OUT/stage.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 1000 \
    > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!

# ViT: 6 blocks of 128 (4 heads), patch 4: 64 tokens on a 32 px global crop, 16 on a 16 px local one.
VIT=(model.arch=vit_tiny_patch16_224 "model.model_kwargs={patch_size: 4, embed_dim: 128, depth: 6, num_heads: 4}"
     model.drop_path_rate=0.1)
probe() {  # probe NAME WORKERS ARGS...
    local name=$1 workers=$2
    shift 2
    timeout "$LIMIT" "$PY" benchmarks/training/recipe_probe.py --data "$DATA" --device cuda --workers "$workers" \
        --name "$name" --out "$OUT" --cache /tmp/probe_cache "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? $(grep -o 'k-NN top-1 epoch.*' "$OUT/$name.log" | tail -1)"
}
T0=$SECONDS
PIDS=()
probe resnet-16ep 2 --epochs 16 --eval-at 0,4,8,12 &
PIDS+=($!)
probe resnet-50ep 4 --epochs 50 --eval-at 5,10,20,30,40 &
PIDS+=($!)
probe vit-p4-16ep 2 --epochs 16 --eval-at 0,4,8,12 --view-sizes 32,64 "${VIT[@]}" &
PIDS+=($!)
probe resnet-64px-16ep 3 --epochs 16 --eval-at 4,8,12 augment.global_size=64 augment.local_size=32 \
    "augment.blur_sigma=[0.06,1.14]" &
PIDS+=($!)
wait "${PIDS[@]}"
kill "$SMI" 2>/dev/null
echo "all probes done in $((SECONDS - T0)) s"
grep -h "k-NN top-1" "$OUT"/*.log
