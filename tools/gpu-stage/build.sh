#!/usr/bin/env bash
# Builds .stage/ray312.tar.xz and .stage/mlflow312.tar.xz: the Python packages the lent GPU machine lacks
# (Python 3.12, x86_64, torch/timm/numpy/pandas/pyarrow/aiohttp/grpcio/protobuf/... present, no network), as
# cp312 manylinux wheels from PyPI unpacked into one tree each, stripped, xz-compressed. ~3 min on 2 cores,
# 37 + 20 MB (a device call carries at most 64 MiB with the working tree). tools/gpu-stage/stage.sh unpacks them.
#
#   bash tools/gpu-stage/build.sh        # then: run(..., carry=[".stage"]) and `source tools/gpu-stage/stage.sh`
#
# The versions are this project's venv's (the same Ray as here). What the machine already has is not shipped;
# what each archive holds and why is in BENCHMARKS.md (GPU figures).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: .stage/ is built there
WORK=${WORK:-/tmp/gpu-stage-build}
PLATFORMS=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
# Ray with its data/train/default extras' packages the machine lacks; webdataset + braceexpand; pydantic (config).
RAY_PKGS=(ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
          pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 tensorboardX==2.6.5
          aiohttp-cors==0.8.1 colorful==0.5.8 py-spy==0.4.3 opencensus==0.11.4 opencensus-context==0.1.3
          google-api-core==2.44.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0 google-auth==2.63.0
          pyasn1==0.6.5 pyasn1_modules==0.4.2 opentelemetry-exporter-prometheus==0.66b2 smart_open==9.0.4
          virtualenv==21.15.14 distlib==0.4.4 platformdirs==4.14.9 python-discovery==1.9.9
          webdataset==1.0.2 braceexpand==0.1.7)
# MLflow's SQLite tracking store, artifacts and pyfunc registration as pipeline/ uses them, and faiss.
MLFLOW_PKGS=(mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1
             mako==1.4.3 cryptography==50.0.2 cffi==2.1.1 fastapi==0.165.0 starlette==1.10.0
             databricks-sdk==0.167.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
             opentelemetry-semantic-conventions==0.66b2 cachetools==7.3.3 sqlparse==0.6.1 importlib-metadata==9.1.0
             faiss-cpu==1.15.1 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3)

strip_ray() {  # the Java workers (33 MB) and RLlib: nothing this project runs imports them
    rm -rf "$WORK/ray312-tree/ray/jars" "$WORK/ray312-tree/ray/rllib"
    printf '#!/usr/bin/env python3\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' \
        > "$WORK/ray312-tree/bin/ray"
    chmod +x "$WORK/ray312-tree/bin/ray"
}
strip_mlflow() {  # the UI's JavaScript build (26 MB), type stubs, packages' own tests
    rm -rf "$WORK/mlflow312-tree/mlflow/server/js" "$WORK/mlflow312-tree/gitdb/test" "$WORK/mlflow312-tree/smmap/test"
    find "$WORK/mlflow312-tree" -name '*.pyi' -delete
}

build_with() {  # build_with NAME STRIP_FN PACKAGES...: download, unpack, strip, compress
    local name=$1 strip=$2
    shift 2
    local wheels="$WORK/$name-wheels" tree="$WORK/$name-tree"
    rm -rf "$wheels" "$tree"
    mkdir -p "$wheels" "$tree/bin" .stage
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$wheels" "$@" 2>&1 | grep -v "is ignored: it is neither" || true
    for w in "$wheels"/*.whl; do unzip -q -o "$w" -d "$tree"; done
    for d in "$tree"/*.data/scripts; do [ -d "$d" ] && mv "$d"/* "$tree/bin/"; done
    rm -rf "$tree"/*.data
    find "$tree" -name __pycache__ -prune -exec rm -rf {} +
    "$strip"
    tar -C "$tree" -cf - . | xz -9 -T0 > ".stage/$name.tar.xz"
    echo "$name: $(ls "$wheels" | wc -l) wheels -> .stage/$name.tar.xz $(du -h ".stage/$name.tar.xz" | cut -f1)"
}

build_with ray312 strip_ray "${RAY_PKGS[@]}"
build_with mlflow312 strip_mlflow "${MLFLOW_PKGS[@]}"
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || echo '/.stage/' >> .git/info/exclude
