#!/usr/bin/env bash
# Every GPU measurement easytrain still owes, as one device run inside a 15-minute lease:
#   here:    bash benchmarks/gpu_wheels.sh
#   device:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Steps run in order of value, each under its own time limit and all under one deadline (BUDGET seconds,
# default 520: a step that would not finish before it is skipped, and says so). A failed step does not stop the
# next. What comes back (the device returns at most 8 files): $OUT/results.jsonl (one JSON line per step, with
# its name), $OUT/session.log (this script's output) and $OUT/logs.tar.gz (each step's full log).
# Order: versions and a smoke run (does easytrain run on the image's jax?); the largest Llama that fits (issue 15
# item 9) with `--scan_layers`, whose layers are built stacked so that the state initialisation compiles once
# whatever the depth (the first run, 2026-12-04, never got past compiling `jit_init` for the unrolled llama-3b
# in 200 s: docs/benchmarks.md, "GPU"), then with `--remat dots`; llama-1b scanned without rematerialisation
# (all its activations kept: the step does only the counted work), then under `dots` at batch 8; llama-1b
# under `dots` with two steps traced (the kernel time by XLA op); llama-1b scanned, against the unrolled
# step measured on 2026-12-04, then with a quarter of its slots trailing padding (cuDNN's key lengths behind
# a conditional per layer); the unrolled llama-3b's setup alone (initialised stacked, then unstacked, since
# 2026-12-04 evening); llama-8b scanned in bfloat16 master weights.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/easytrain-gpu}
mkdir -p "$OUT/logs"
DEADLINE=$((SECONDS + ${BUDGET:-520}))
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -z "${EASYTRAIN_GPU_NO_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheels did not install: run benchmarks/gpu_wheels.sh here and carry .whl"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi

python3 -c "
import importlib.metadata as m
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
print({name: version(name) for name in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'flax', 'optax', 'orbax-checkpoint',
       'transformers', 'datasets', 'tokenizers', 'huggingface-hub', 'pyarrow', 'tensorstore', 'numpy')})
import jax
print(jax.devices(), jax.devices()[0].device_kind, (jax.devices()[0].memory_stats() or {}).get('bytes_limit'))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv

step() {  # step NAME SECONDS [ENV=VALUE ...] -- ARGS...: one benchmarks.gpu run, if it fits before the deadline
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
    shift 2
    local env=()
    while [ "$1" != "--" ]; do env+=("$1"); shift; done
    shift
    if [ "$left" -lt 45 ]; then echo "== $name: skipped, ${left}s left before the deadline"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): ${env[*]} python3 -m benchmarks.gpu $*"
    env "${env[@]}" timeout "$limit" python3 -m benchmarks.gpu "$@" --out "$OUT/logs/$name.json" \
        > "$OUT/logs/$name.log" 2>&1
    echo "exit $? at ${SECONDS}s"
    if [ -s "$OUT/logs/$name.json" ]; then
        python3 -c "import json, sys; print(json.dumps({'step': sys.argv[1], **json.load(open(sys.argv[2]))}))" \
            "$name" "$OUT/logs/$name.json" | tee -a "$OUT/results.jsonl"
    else
        tail -c 2500 "$OUT/logs/$name.log"
    fi
}
DPA=(--attention_implementation dot_product_attention)
step quick 60 -- --quick
step largest_scan 200 -- --scan_layers "${DPA[@]}"
step largest_scan_dots 150 -- --config llama-3b --scan_layers --remat dots "${DPA[@]}"
# No rematerialisation: the step does only the work MFU counts (under `full` the hardware does about 4/3 of it);
# llama-1b's activations at 4 x 2048 tokens fit an H200 whole (its plan refuses the run before a step otherwise).
step llama1b_scan_none 90 -- --config llama-1b --scan_layers --remat none "${DPA[@]}"
# Twice the tokens per step (8 x 2048): the first run's 8192 tokens leave a 1B model's matmuls small for an H200;
# under `dots` it held 30.5 GB at batch 4, so batch 8 fits with room to spare.
step llama1b_dots_b8 90 -- --config llama-1b --scan_layers --remat dots --batch 8 "${DPA[@]}"
# Where llama-1b's step time goes under `dots`: steps 5-6 traced (profile_steps), the result's "trace" holding the
# kernel time by XLA op (benchmarks.trace_summary); its tokens/s include the tracing, so they are not a headline.
step llama1b_dots_trace 120 -- --config llama-1b --scan_layers --remat dots --profile_steps 2 --profile_start_step 5 \
    "${DPA[@]}"
step llama1b_scan 90 -- --config llama-1b --scan_layers "${DPA[@]}"
# Trailing padding: cuDNN's key-length path, one lax.cond per layer (docs/benchmarks.md, "the second check")
step llama1b_scan_padded 90 -- --config llama-1b --scan_layers --padding 0.25 "${DPA[@]}"
# The unrolled llama-3b's setup, which on 2026-12-04 never got past compiling its initialisation in 200 s: the
# trainer now initialises a fresh model with its layers stacked (one layer's program) and unstacks it outside
# that program, so this should take about what the scanned run's setup takes.
step unrolled_3b_setup 100 -- --config llama-3b --setup_only "${DPA[@]}"
step largest_bf16 150 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 -- --config llama-8b --param_dtype bfloat16 \
    --scan_layers "${DPA[@]}"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "done at ${SECONDS}s"
