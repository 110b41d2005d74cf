#!/usr/bin/env bash
# Read block sizes of Ray Data's multi-crop stage on all of one GPU machine's cores: benchmarks/data/
# pipeline_throughput.py once per variant, pipeline.data.stage.split_read_blocks replaced for that run:
# `unsplit` keeps Ray Data's merged read blocks, `splitN` cuts them into blocks of N rows. One log per variant
# under $OUT (pipeline-<variant>.log); the execution plan, rates and cores used are printed.
#
#   OUT=/tmp/read_blocks VARIANTS="unsplit split64 split256 split512" bash benchmarks/gpu/read_blocks.sh
#
# Data: the synthetic set of benchmarks/gpu/ray.sh (2,560 + 512 images at 224 px in $WORK/data), generated if
# missing. Ray etc. come from tools/gpu-stage/stage.sh when python3 lacks them. Since the split is configured
# (ray.read_block_rows), `pipeline_throughput.py --set ray.read_block_rows=N` compares sizes without this patch.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu/read_blocks}
WORK=${WORK:-/tmp/gpu-ray}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1
if ! python3 -c "import ray, pydantic, webdataset, braceexpand" 2>/dev/null; then
    # shellcheck source=tools/gpu-stage/stage.sh
    source tools/gpu-stage/stage.sh > "$OUT/stage.log" 2>&1 || { cat "$OUT/stage.log"; exit 1; }
fi
[ -d "$WORK/data" ] || timeout 100 python3 -c "from pipeline.data import make_synthetic_dataset as m; \
m('$WORK/data', n_train=2560, n_val=512, image_size=224, seed=0)" > "$OUT/data.log" 2>&1
echo "data rc $?"
for v in ${VARIANTS:-unsplit split64 split256}; do
timeout 150 python3 - --shards "$WORK/data" --cores "$(nproc)" --n-local 10 --passes 8 --warmup 4000 --limit 12000 \
    --single-limit 1500 > "$OUT/pipeline-$v.log" 2>&1 <<PY
import runpy, sys
sys.path.insert(0, ".")
import pipeline.data.stage as d
orig = d.split_read_blocks
v = "$v"
if v == "unsplit":
    d.split_read_blocks = lambda reads, *a, **k: reads
elif v.startswith("split"):
    d.split_read_blocks = lambda reads, rows, *a, **k: orig(reads, int(v[5:]), *a, **k)
sys.argv = ["benchmarks/data/pipeline_throughput.py"] + sys.argv[1:]
runpy.run_path("benchmarks/data/pipeline_throughput.py", run_name="__main__")
PY
echo "== $v rc $?"
grep -E "Execution plan|single core|Ray Data,|scaling|cores used|per actor" "$OUT/pipeline-$v.log" \
    | sed 's/.*Execution plan[^:]*: //'
done
