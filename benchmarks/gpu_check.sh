#!/usr/bin/env bash
# The GPU check of issue 24, in two steps, from the repository's root:
#
#   bash benchmarks/gpu_check.sh prepare     # here (pip reaches a package index): fills .gpu/ (ignored)
#   bash benchmarks/gpu_check.sh run [PART...]  # on the GPU machine, with .gpu/ carried
#
# prepare: the wheels a machine with torch, torchvision, numpy, pandas and matplotlib but without
# Hydra, OmegaConf and MLflow needs (Python 3.12, manylinux x86-64), the hymenoptera folder and
# the tutorial's script (../shared does not travel), all under .gpu/ (about 60 MiB).
# run: installs the wheels and visiontune (no network), then, each part with its own time limit
# and its log under $OUT (or .gpu/logs): `pytest -m gpu` (tests/test_gpu.py), then
# benchmarks/seed_vs_visiontune.py --workers 4, then benchmarks/sweep_vs_tutorial.py with the
# joblib launcher (6 models x 3 modes x 15 epochs). PARTs: tests, seed, sweep (default: all three).
# A part that fails or runs out of time is logged and the next one runs; the exit code is the
# number of parts that failed. Their limits are 4 + 3.3 + 7 minutes, and one call of the device
# tool runs 10 at most: `run tests seed` in one call (timeout_s 540), `run sweep` in a second
# (timeout_s 480), the machine kept warm between them.
# A dry run on a CPU machine (the tests skip, the install is left out):
#   GPU_CHECK_INSTALL=0 PYTHON=.venv/bin/python OUT=/tmp/gpu bash benchmarks/gpu_check.sh run tests
set -u
cd "$(dirname "$0")/.."
GPU=.gpu
PY=${PYTHON:-python3}

prepare() {
    local pip=("${PIP_PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 -d "$GPU/wheels")
    mkdir -p "$GPU/wheels"
    # What visiontune, MLflow's tracking store and its models import, less what the machine has
    # (numpy, pandas, pyarrow, matplotlib, pyyaml, requests, click, jinja2, protobuf, joblib, ...).
    # omegaconf's parser runtime is published as source only: built here into a pure-Python wheel.
    "${PIP_PYTHON:-python3}" -m pip wheel -q --no-deps -w "$GPU/wheels" antlr4-python3-runtime==4.9.3 || return 1
    "${pip[@]}" hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0 \
        mlflow==3.17.2 \
        sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 sqlparse==0.6.1 cachetools==7.3.3 \
        opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
        opentelemetry-semantic-conventions==0.66b2 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        python-dotenv==1.2.4 databricks-sdk==0.167.0 google-auth==2.63.0 pyasn1-modules==0.4.2 \
        pyasn1==0.6.5 importlib-metadata==9.1.0 fastapi==0.165.0 starlette==1.10.0 \
        annotated-doc==0.0.7 uvicorn==0.55.0 || return 1
    # The mlflow wheel holds all of mlflow-skinny's and mlflow-tracing's code (neither is carried);
    # its web UI (7 MiB packed) is left out: with the data set, the carried folder stays under 64 MiB.
    "${PIP_PYTHON:-python3}" - "$GPU"/wheels/mlflow-3*.whl <<'PYTHON' || return 1
import os, sys, zipfile
wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(wheel + ".new", "w", zipfile.ZIP_DEFLATED) as new:
    for item in old.infolist():
        if not item.filename.startswith("mlflow/server/js/"):
            new.writestr(item, old.read(item.filename))
os.replace(wheel + ".new", wheel)
PYTHON
    rm -rf "$GPU/hymenoptera_data" && cp -r ../shared/hymenoptera_data "$GPU/" || return 1
    cp ../shared/reference/seed_tutorial.py "$GPU/" || return 1
    grep -qx '/.gpu/' .gitignore || echo "warning: add /.gpu/ to .gitignore, or it travels as untracked files"
    du -sh "$GPU"
}

install() {  # GPU_CHECK_INSTALL=0: use the environment as it is (a dry run on a CPU machine)
    [[ ${GPU_CHECK_INSTALL:-1} == 0 ]] && return 0
    $PY -m pip install -q --no-index --no-deps --no-compile "$GPU"/wheels/*.whl || return 1
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
    $PY -m pip check 2>&1 | grep -iE "hydra|omegaconf|mlflow|visiontune|sqlalchemy" || true
    $PY -c "import torch, mlflow, hydra, visiontune; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
}

part() {  # part NAME SECONDS COMMAND...: the command under a time limit, its output in NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local tic=$SECONDS
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - tic))s"
    tail -n 25 "$LOGS/$name.log"
    return $rc
}

run() {
    local failed=0 name
    LOGS=${OUT:-$GPU/logs}
    mkdir -p "$LOGS"
    install >"$LOGS/install.log" 2>&1 || { cat "$LOGS/install.log"; return 99; }
    cat "$LOGS/install.log"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
    local data=(--data "$GPU/hymenoptera_data" --seed-script "$GPU/seed_tutorial.py")
    for name in ${@:-tests seed sweep}; do
        case $name in
        tests) part tests 240 $PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rs ;;
        seed) part seed 200 $PY benchmarks/seed_vs_visiontune.py --workers 4 "${data[@]}" ;;
        # One GPU: three jobs at once share it (device=auto puts job n on GPU n % 1), 4 workers each.
        sweep) part sweep 420 $PY benchmarks/sweep_vs_tutorial.py --workers 4 "${data[@]}" \
            hydra/launcher=joblib hydra.launcher.n_jobs=3 ;;
        *) echo "unknown part $name: tests, seed or sweep" && false ;;
        esac || failed=$((failed + 1))
    done
    echo "parts failed: $failed"
    return $failed
}

case ${1:-} in
prepare) prepare ;;
run)
    shift
    run "$@"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh prepare | run [tests] [seed] [sweep]" >&2
    exit 2
    ;;
esac
