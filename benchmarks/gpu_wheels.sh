#!/usr/bin/env bash
# The wheels a GPU device run needs beside the device image's own packages, downloaded here into .whl/
# (git-ignored; the device tool carries it): easytrain's pure-Python pins the image lacks or holds at other
# versions. The image's jax, jaxlib and CUDA plugin stay (over 200 MB, more than one call may carry), so a
# device run checks easytrain against that jax. Then: benchmarks/gpu_session.sh on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
# The device image's jax is newer than easytrain's pin (0.11.2 on 2026-12-04), and flax 0.12.8 does not import
# under it (`flax.nnx.variablelib` needs `jax.experimental.hijax.HiPrimitive`); flax 0.12.12 does, and easytrain's
# smoke and GPU-path runs pass with it under jax 0.11.2 on CPU. Every other package keeps its pin.
pins=(flax==0.12.12)
for name in optax orbax-checkpoint transformers datasets grain tensorboardX dill multiprocess array_record \
            portpicker fsspec; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt) || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
    pins+=("$pin")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${pins[@]}"
du -sh .whl
