"""Smoke test of benchmarks/versus_torch.py at a tiny size: every contender runs in its own child process and
reports tokens/s, CPU MFU and the ratios (no timing asserted)."""

import json
import os

import pytest

pytest.importorskip("torch")

from benchmarks import headlines, report, versus_torch  # noqa: E402
from runs import without_hidden_torch  # noqa: E402

TORCH_SIDES = ("hf_trainer", "torch_loop")


@pytest.fixture
def torch_for_torch_sides(monkeypatch) -> list[str]:
    """Only the PyTorch contenders' children start with PyTorch; the JAX ones start as the suite's other children do,
    without it (as under easytrain's runtime install): with it, transformers' configuration module imported it, about
    1.5 s of CPU in each JAX child. Returns the contenders started, in order."""
    started = []

    def child_json(module: str, *args: str, env: dict[str, str] | None = None) -> dict:
        contender = args[args.index("--child") + 1]
        started.append(contender)
        if contender in TORCH_SIDES:
            env = {**os.environ, "PYTHONPATH": without_hidden_torch(os.environ.get("PYTHONPATH", ""))}
        return report.child_json(module, *args, env=env)

    monkeypatch.setattr(versus_torch, "child_json", child_json)
    return started


def test_versus_torch_smoke(tmp_path, torch_for_torch_sides):
    out = tmp_path / "versus_torch.json"
    result = versus_torch.main(["--quick", "--warmup", "1", "--windows", "1", "--window_steps", "2",
                                "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert sorted(torch_for_torch_sides) == sorted(versus_torch.CONTENDERS), "each in a child process of its own"
    contenders = result["contenders"]
    assert set(contenders) == set(versus_torch.CONTENDERS)
    for row in contenders.values():
        assert row["tokens_per_second"] > 0 and row["tokens_per_cpu_second"] > 0 and 0 < row["cpu_mfu"] < 1
        assert row["min"] <= row["tokens_per_second"] <= row["max"] and row["peak_rss_mib"] > 0
        assert len(row["per_round"]) == 1 and row["min"] <= row["per_round"][0] <= row["max"]
        assert row["per_round_tokens_per_cpu_second"][0] > 0
        for name in ("minor_faults", "system_ms", "stolen_ms"):
            assert row[f"per_round_{name}_per_step"][0] >= 0
        assert all(ms >= 1.0 for ms in row["per_round_thread_ms_per_step"][0].values())  # by thread name
    for name, row in contenders.items():  # every side's first step runs until step 1's results are ready
        assert row["first_step_ready_seconds"] > 0 and "first_step_seconds" not in row, name
        jax_side = name in ("easytrain", "nnx_step")
        assert (row["trace_compile_seconds"] is not None) == jax_side, name
        if jax_side:
            assert row["first_step_ready_seconds"] >= row["trace_compile_seconds"] > 0, name  # rounded to ms
    assert contenders["hf_trainer"]["details"]["attention"]  # what the peer really ran, recorded
    assert set(result["ratios"]) == {f"{a}_over_{b}" for a, b in versus_torch.PAIRS}
    assert result["ratio_easytrain_over_hf_trainer"] == result["ratios"]["easytrain_over_hf_trainer"]
    assert set(result["round_ratios"]) == set(result["ratios"])
    assert result["round_ratios"]["easytrain_over_hf_trainer"] == [pytest.approx(
        contenders["easytrain"]["per_round"][0] / contenders["hf_trainer"]["per_round"][0], rel=1e-3)]
    headline = headlines.versus_torch(result)[0]  # the chart's bar, its whisker the rounds' spread
    assert headline.value == result["ratios"]["easytrain_over_hf_trainer"]
    assert headline.low == headline.high == result["round_ratios"]["easytrain_over_hf_trainer"][0]
    assert result["flops_per_token"] > 0 and min(result["matmul_flops_per_second"].values()) > 0
