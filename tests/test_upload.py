"""Host batches become global arrays laid out by the batch sharding, on one device and on eight."""

import subprocess
import sys

import jax
import numpy as np

from easytrain import sharding
from runs import child_env, xla_flags


def _batch() -> dict[str, np.ndarray]:
    return {"input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "loss_mask": np.ones((8, 5), np.float32)}


def _check_upload() -> int:
    """Uploads a batch on this process's devices and checks it; returns how many devices hold rows."""
    layout = sharding.batch_sharding(sharding.make_mesh())
    host = _batch()
    uploaded = sharding.to_global_arrays(host, layout)
    for name, values in host.items():
        array = uploaded[name]
        assert isinstance(array, jax.Array) and array.sharding == layout and array.dtype == values.dtype
        np.testing.assert_array_equal(np.asarray(array), values)
    for offset in range(16):  # the device copies are their own: a later change on the host reaches none (on CPU a
        # shard placed without a copy shares the host buffer where that is aligned: rows at every 4-byte offset of 64)
        rows = np.arange(offset + 40, dtype=np.int32)[offset:].reshape(8, 5)
        expected = rows.copy()
        uploaded_rows = sharding.to_global_arrays({"rows": rows}, layout)["rows"]
        rows[...] = -1
        for shard in uploaded_rows.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
    with jax.transfer_guard("disallow"):  # an intended upload, as `jax.device_put` is
        sharding.to_global_arrays(_batch(), layout)
    return len({shard.device for shard in uploaded["input_ids"].addressable_shards})


def test_a_batch_is_uploaded_whole_on_one_device():
    assert _check_upload() == jax.device_count() == 1


def test_a_batch_is_split_by_rows_over_eight_devices():
    code = "import test_upload; print(test_upload._check_upload())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=child_env(XLA_FLAGS=xla_flags(8)), cwd=__file__.rsplit("/", 1)[0])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "8"
