export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1
source benchmarks/gpu_stage.sh > $OUT/stage.log 2>&1 || { cat $OUT/stage.log; exit 1; }
[ -d /tmp/gpu_ray/data ] || timeout 100 python3 -c "from pipeline.synthetic import make_synthetic_dataset as m; m('/tmp/gpu_ray/data', n_train=2560, n_val=512, image_size=224, seed=0)" > $OUT/data.log 2>&1; echo data rc $?
for v in ${VARIANTS:-unsplit split64 split256}; do
timeout 150 python3 - --shards /tmp/gpu_ray/data --cores $(nproc) --n-local 10 --passes 8 --warmup 4000 --limit 12000 --single-limit 1500 > $OUT/pipeline-$v.log 2>&1 <<PY
import runpy, sys
sys.path.insert(0, ".")
import pipeline.data as d
orig = d.split_read_blocks
v = "$v"
if v == "unsplit":
    d.split_read_blocks = lambda reads, *a, **k: reads
elif v.startswith("split"):
    d.split_read_blocks = lambda reads, rows, *a, **k: orig(reads, int(v[5:]), *a, **k)
sys.argv = ["benchmarks/pipeline_throughput.py"] + sys.argv[1:]
runpy.run_path("benchmarks/pipeline_throughput.py", run_name="__main__")
PY
echo "== $v rc $?"; grep -E "Execution plan|single core|Ray Data,|scaling|cores used|per actor" $OUT/pipeline-$v.log | sed 's/.*Execution plan[^:]*: //'
done
