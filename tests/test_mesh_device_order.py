"""The order `make_mesh` lays devices out in: row-major over (data, fsdp, tensor), so a tensor-parallel group is
consecutive devices of `jax.devices()` (which lists each process's devices together) and stays within a host, as
docs/scaling.md advises. A column-major grid changes nothing on one process, but puts a host's devices in different
tensor groups on several."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import easytrain
from runs import child_env, xla_flags

SCRIPT = """
import json, jax
from easytrain.sharding import make_mesh
order = {device.id: index for index, device in enumerate(jax.devices())}
print(json.dumps({str(sizes): [[[order[device.id] for device in row] for row in plane]
                               for plane in make_mesh(*sizes).devices.tolist()]
                  for sizes in ((2, 2, 2), (1, 2, 4), (4, 1, 2))}))
"""


@pytest.fixture(scope="module")
def grids(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each layout's device grid on 8 CPU devices, as positions in `jax.devices()`, from the easytrain this process
    imported (run elsewhere than the checkout, whose directory `-c` would put first on the path)."""
    env = child_env(XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(easytrain.__file__).parents[1]), env["PYTHONPATH"]])  # this easytrain
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path_factory.mktemp("mesh"))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 2, 4), (4, 1, 2)])
def test_the_mesh_lays_devices_out_row_major(grids: dict, sizes: tuple) -> None:
    expected = [[list(range(start, start + sizes[2])) for start in range(plane, plane + sizes[1] * sizes[2], sizes[2])]
                for plane in range(0, 8, sizes[1] * sizes[2])]
    assert grids[str(sizes)] == expected


def test_a_tensor_group_is_consecutive_devices(grids: dict) -> None:
    for plane in grids[str((1, 2, 4))]:
        for group in plane:
            assert group == list(range(group[0], group[0] + 4))
