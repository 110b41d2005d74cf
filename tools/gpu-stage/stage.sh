# Python packages for a machine that cannot download them (the lent GPU machine: Python 3.12, torch, timm, no Ray):
# unpacks the archives of .stage/ into $STAGE_SITE and puts it on PYTHONPATH and PATH. Source it:
#
#   source tools/gpu-stage/stage.sh          # from the repo root; returns non-zero if something is missing
#
# A later call on the same (still warm) machine may come without .stage: a complete earlier unpack is reused.
#
# .stage/ray312.tar.xz: ray 2.60.0 (no Java jars, no rllib) with the data, train and dashboard extras' packages
# the machine lacks (jsonschema stack, pydantic 2, tensorboardX, opencensus, py-spy, ...), webdataset,
# braceexpand; .stage/mlflow312.tar.xz: mlflow 3.17.2 (no UI build) with SQLAlchemy, alembic, opentelemetry,
# faiss-cpu. Both are cp312 manylinux x86_64 trees built from PyPI wheels by tools/gpu-stage/build.sh.
STAGE_SITE=${STAGE_SITE:-/tmp/site312}
_stage_archives=".stage/ray312.tar.xz .stage/mlflow312.tar.xz"
_stage_t0=$SECONDS
_stage_missing=""
for _a in $_stage_archives; do
    [ -f "$_a" ] || _stage_missing="$_stage_missing $_a"
done
if [ -n "$_stage_missing" ] && [ -f "$STAGE_SITE/.complete" ]; then
    # A later call on the same machine, without the archives: an earlier one unpacked them completely.
    echo "gpu-stage: reusing $STAGE_SITE (unpacked by an earlier call;$_stage_missing not carried this time)"
elif [ -n "$_stage_missing" ]; then
    echo "gpu-stage:$_stage_missing missing (build with: bash tools/gpu-stage/build.sh; then carry .stage)" >&2
    return 1 2>/dev/null || exit 1
else
    mkdir -p "$STAGE_SITE"
    rm -f "$STAGE_SITE/.complete"
    for _a in $_stage_archives; do
        xz -dc -T0 "$_a" | tar -x -C "$STAGE_SITE" \
            || { echo "gpu-stage: could not unpack $_a" >&2; return 1 2>/dev/null || exit 1; }
    done
    touch "$STAGE_SITE/.complete"
    echo "gpu-stage: unpacked into $STAGE_SITE in $((SECONDS - _stage_t0)) s"
fi
export PYTHONPATH="$STAGE_SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$STAGE_SITE/bin:$PATH"
python3 -c 'import ray, ray.data, ray.train.torch, pydantic, webdataset, braceexpand, mlflow, faiss, sqlalchemy
print("gpu-stage: ray", ray.__version__, "pydantic", pydantic.__version__, "mlflow", mlflow.__version__,
      "faiss", faiss.__version__)' \
    || { echo "gpu-stage: the staged packages do not import" >&2; return 1 2>/dev/null || exit 1; }
