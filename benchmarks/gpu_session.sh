#!/usr/bin/env bash
# Every GPU measurement easytrain still owes, as one device run (about 8 minutes of a 15-minute lease):
#   here:    bash benchmarks/gpu_wheels.sh
#   device:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Each step has its own time limit and writes $OUT/<name>.json and <name>.log; a failed step does not stop
# the next. Order: versions and a smoke run (does easytrain run on the image's jax?), the largest Llama that
# fits (issue 15 item 9), then the non-finite guard's cost on a GPU (docs/benchmarks.md, "GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/easytrain-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels did not install: run benchmarks/gpu_wheels.sh here and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD

python3 -c "
import jax, flax, optax, orbax.checkpoint as ocp, transformers, grain, datasets
print({m.__name__: m.__version__ for m in (jax, flax, optax, transformers, datasets)}, 'orbax', ocp.__version__)
print(jax.devices(), jax.devices()[0].device_kind)" 2>&1 | tee "$OUT/versions.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/versions.log" 2>&1

step() {  # step NAME SECONDS ARGS...: one benchmarks.gpu run
    local name=$1 limit=$2
    shift 2
    echo "== $name: python3 -m benchmarks.gpu $*"
    timeout "$limit" python3 -m benchmarks.gpu "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "exit $? after ${SECONDS}s in all"
    tail -c 1500 "$OUT/$name.log"
}
step quick 90 --quick
step largest 240 --attention_implementation dot_product_attention
step guard_on 120 --config llama-1b --attention_implementation dot_product_attention
step guard_off 120 --config llama-1b --attention_implementation dot_product_attention --non_finite_policy ignore
