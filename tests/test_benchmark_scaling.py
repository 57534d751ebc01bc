"""Smoke test of benchmarks/scaling.py at a tiny size on 8 CPU devices (no timing asserted): every layout
trains the same model to the same losses, and FSDP holds an eighth of the state per device."""

from pathlib import Path

import pytest

from benchmarks import run
from runs import facts_on_eight_devices

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


def test_scaling_benchmark_smoke():
    # Given the suite's XLA flags and no device count, the script keeps them and adds its 8 devices.
    result = facts_on_eight_devices(SCRIPT, "--quick", "--rounds", "7", "--meshes", "8,1,1", "1,8,1",
                                    script_sets_devices=True)
    assert result["benchmark"] == "scaling" and result["devices"] == 8
    data, fsdp = result["meshes"]
    assert data["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}

    reference = data["plain"]["losses"]
    assert len(reference) == 7 and reference[-1] < reference[0]  # it trains (after the warm-up's zero rate)
    for mesh in (data, fsdp):
        for variant in ("plain", "constrained"):  # the same training, whatever the layout
            assert mesh[variant]["losses"] == pytest.approx(reference, rel=1e-5)
            assert mesh[variant]["step_seconds"] > 0 and mesh[variant]["temp_bytes"] > 0

    total = data["param_bytes_total"]
    assert data["param_bytes_per_device"] == total  # data parallel: every device holds all of it
    assert fsdp["param_bytes_per_device"] < total / 4
    assert fsdp["opt_bytes_per_device"] < data["opt_bytes_per_device"] / 4
    assert "all-gather" in fsdp["constrained"]["collectives"]  # FSDP gathers its weights
    assert set(data["plain"]["collectives"]) == {"all-reduce"}  # data parallel only sums gradients
    assert all(h.value is not None for h in run.BENCHMARKS["scaling"].headlines(result))
