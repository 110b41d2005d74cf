#!/usr/bin/env bash
# Ray checks on one GPU machine in one go: Ray Data's multi-crop stage on all its cores against
# cores x the single-core rate, then the real pretraining job (jobs/pretrain.py) with its training worker on
# the GPU, checkpoints, export and the k-NN evaluation embedding on the GPU. Logs and JSON under $OUT.
#
#   OUT=/tmp/gpu-ray bash benchmarks/gpu/ray.sh             # python3 holds torch + timm; Ray etc. staged
#
# Ray, pydantic, webdataset, braceexpand, MLflow and faiss come from .stage/ (tools/gpu-stage/stage.sh) when
# python3 lacks them. Data: the synthetic shapes set at 224 px, generated here (GEN_TRAIN / GEN_VAL images).
# Expected ~4-5 min on a 16-core H200 machine: staging ~20 s, data ~40 s, the stage ~1.5 min, the job ~2 min.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu/ray}
PY=${PY:-python3}
GEN_TRAIN=${GEN_TRAIN:-2560}
GEN_VAL=${GEN_VAL:-512}
WORK=${WORK:-/tmp/gpu-ray}
PIPELINE_ARGS=${PIPELINE_ARGS:---passes 8 --warmup 4000 --limit 12000 --single-limit 1500}
JOB_ARGS=${JOB_ARGS:-}  # more key=value overrides of the job (the last one of a key wins)
LOG="$OUT/ray.log"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1
CORES=$(nproc)

if ! "$PY" -c "import ray, pydantic, webdataset, braceexpand" 2>/dev/null; then
    # shellcheck source=tools/gpu-stage/stage.sh
    source tools/gpu-stage/stage.sh > "$OUT/stage.log" 2>&1
    rc=$?
    tee -a "$LOG" < "$OUT/stage.log"
    [ "$rc" -eq 0 ] || { echo "staging failed (exit $rc)" | tee -a "$LOG"; exit 1; }
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, 'cores', $CORES)"
} 2>&1 | tee -a "$LOG"

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $* (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

step data 120 "$PY" -c "from pipeline.data import make_synthetic_dataset as m; \
m('$WORK/data', n_train=$GEN_TRAIN, n_val=$GEN_VAL, image_size=224, seed=0)"

# Ray Data on every core: 10 local crops as the paper; passes so that warm-up + timed window fit the stream.
# shellcheck disable=SC2086
step pipeline 200 "$PY" benchmarks/data/pipeline_throughput.py --shards "$WORK/data" --cores "$CORES" --n-local 10 \
    $PIPELINE_ARGS

# The real job: the ViT-S/16 ImageNet preset (2x224 + 10x96, batch 64), 4 epochs, one GPU worker; augmentation on
# the other cores.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!
ACTORS=$((CORES > 4 ? CORES - 3 : 1))  # one core for the trainer, one for shard reads, one for the driver and Ray's own processes
step pretrain 300 "$PY" jobs/pretrain.py --config "${JOB_CONFIG:-vit_small_imagenet}" "data.root=$WORK/data" "output_dir=$WORK/out" \
    "ray.storage_path=$WORK/ray" "tracking.tracking_uri=sqlite:///$WORK/mlflow.db" tracking.register_model=null \
    tracking.run_name=gpu-check ray.num_workers=1 ray.use_gpu=true ray.cpus_per_worker=1 \
    "ray.augment_actors_min=$ACTORS" "ray.augment_actors_max=$ACTORS" ray.read_cpus_per_task=0.5 \
    optim.epochs=4 optim.warmup_epochs=1 loss.warmup_teacher_temp_epochs=1 optim.batch_size_per_worker=64 knn.batch_size=256 \
    health.attention_every_epochs=2 ray.checkpoint_every_epochs=1 $JOB_ARGS
kill "$SMI" 2>/dev/null
"$PY" - "$OUT/gpu_util.csv" <<'EOF' 2>&1 | tee -a "$LOG"
import sys
rows = [line.split(", ") for line in open(sys.argv[1]) if line.count(",") == 2]
util = [float(r[1]) for r in rows]
busy = [u for u in util if u > 0]
if util:
    print(f"GPU utilisation over the job: mean {sum(util) / len(util):.1f} % of {len(util)} samples (0.5 s); "
          f"while in use: mean {sum(busy) / max(1, len(busy)):.1f} % over {len(busy) / 2:.0f} s; "
          f"peak memory {max(float(r[2]) for r in rows):.0f} MiB")
EOF
echo "=== done after $SECONDS s" | tee -a "$LOG"
grep -h -E "^SUMMARY|scaling vs|single core|Ray Data, " "$LOG" || true
