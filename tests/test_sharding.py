"""The math does not change with the layout: 1 device vs 8 CPU devices in several meshes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from easytrain import ArgumentError
from easytrain.sharding import logical_to_spec, resolve_mesh_shape

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"1 device": (1, 1, 1, 1), "(8,1,1)": (8, 1, 1, 8), "(1,8,1)": (1, 8, 1, 8),
           "(2,4,1)": (2, 4, 1, 8), "(2,2,2)": (2, 2, 2, 8)}


def run_layout(data, fsdp, tensor, devices, *extra) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "mesh_equivalence.py"),
                             *map(str, (data, fsdp, tensor, devices, *extra))],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def layouts() -> dict[str, dict]:
    return {name: run_layout(*shape) for name, shape in LAYOUTS.items()}


@pytest.mark.slow
def test_losses_agree_across_layouts(layouts):
    reference = layouts["1 device"]["losses"]
    assert len(reference) == 5 and reference[0] != reference[-1]
    for name, result in layouts.items():
        for step, (a, b) in enumerate(zip(result["losses"], reference), start=1):
            assert a == pytest.approx(b, abs=1e-5, rel=1e-5), f"{name} step {step}: {a} vs {b}"


@pytest.mark.slow
def test_parameters_are_really_sharded(layouts):
    fsdp = layouts["(1,8,1)"]
    assert fsdp["specs"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == str(P('fsdp', None))
    assert fsdp["shard_shapes"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == [128 // 8, 512]
    hybrid = layouts["(2,2,2)"]
    assert hybrid["specs"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == str(P('fsdp', 'tensor'))
    assert hybrid["shard_shapes"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == [64, 256]
    data_only = layouts["(8,1,1)"]
    assert data_only["specs"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == str(P(None, None))


@pytest.mark.slow
def test_fsdp_holds_about_one_eighth_per_device(layouts):
    fsdp = layouts["(1,8,1)"]
    # Only the norm scales stay replicated.
    assert fsdp["param_bytes_per_device"] < 0.16 * fsdp["param_bytes"]
    assert fsdp["opt_bytes_per_device"] < 0.16 * fsdp["opt_bytes"]
    assert layouts["(8,1,1)"]["param_bytes_per_device"] == layouts["(8,1,1)"]["param_bytes"]


@pytest.mark.slow
def test_checkpoint_from_one_layout_resumes_on_others(layouts, tmp_path):
    """Saved on (2,2,2) at step 3; resumed on (8,1,1) and on 1 device: the loss curve continues."""
    import shutil

    reference = layouts["1 device"]["losses"]
    saved = run_layout(2, 2, 2, 8, str(tmp_path / "a"), 3, 0)
    assert saved["losses"] == pytest.approx(reference[:3], abs=1e-5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for directory, shape in (("a", (8, 1, 1, 8)), ("b", (1, 1, 1, 1))):
        resumed = run_layout(*shape, str(tmp_path / directory), 0, 1)
        assert resumed["losses"] == pytest.approx(reference[3:], abs=1e-5, rel=1e-5), (directory, shape)


@pytest.mark.slow
@pytest.mark.parametrize("shape, accumulation", [((1, 1, 1, 1), 4), ((2, 2, 2, 8), 2), ((8, 1, 1, 8), 2)])
def test_gradient_accumulation_on_any_layout_matches(layouts, shape, accumulation):
    result = run_layout(*shape, "", 0, 0, accumulation)
    assert result["losses"] == pytest.approx(layouts["1 device"]["losses"], abs=1e-5, rel=1e-5)


def test_mesh_shape_resolution_and_errors():
    assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ArgumentError, match="needs 6 devices but 8"):
        resolve_mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ArgumentError, match="not divisible"):
        resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ArgumentError, match="only one mesh axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_logical_rules_replicate_what_does_not_divide():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 2, "tensor": 4}

    assert str(logical_to_spec(("embed", "mlp"), (128, 512), FakeMesh())) == str(P('fsdp', 'tensor'))
    assert str(logical_to_spec(("vocab", "embed"), (18, 128), FakeMesh())) == str(P(None, 'fsdp'))
    assert str(logical_to_spec(("norm",), (128,), FakeMesh())) == str(P(None,))
