"""What the benchmarks' first-step and compile fields measure, and the small fixes of their reporting: every side's
first step ends when step 1's results are ready (easytrain's used to be its trace + compile + launch only), ratios
come from unrounded medians, the docs' commands run as written. No timing is asserted beyond order."""

import re
from pathlib import Path

import numpy as np
import pytest
import transformers

from benchmarks import easydel_peer, headlines, overhead, remat, run, versus_torch
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = {**versus_torch.CONFIG, **versus_torch.QUICK["config"]}


def blocks() -> np.ndarray:
    return versus_torch.token_blocks(TINY["vocab_size"], 2, 16)


@pytest.mark.parametrize("runner", [versus_torch.run_easytrain, versus_torch.run_nnx_step])
def test_jax_first_step_includes_its_run(runner):
    """easytrain's and the NNX step's first step is trace + compile + launch and the run, as the PyTorch sides'."""
    result = runner(TINY, blocks(), 2, warmup=1, windows=1, every=1)
    assert result["trace_compile_seconds"] > 0
    assert result["first_step_ready_seconds"] > result["trace_compile_seconds"]


def test_summary_names_what_each_first_step_field_holds():
    rows = [{"window_seconds": [2.0, 4.0], "window_cpu_seconds": [2.0, 4.0], "timed_minor_faults": 0,
             "timed_system_seconds": 0.0, "timed_stolen_seconds": 0.0, "timed_thread_seconds": {},
             "first_step_ready_seconds": 10.0, "trace_compile_seconds": 7.0, "peak_rss_mib": 1.0, "details": {}}]
    row = versus_torch.summarise({"easytrain": rows}, tokens_per_step=1, every=2, flops_per_token=1, peak=1e9)
    side = row["easytrain"]
    assert side["first_step_ready_seconds"] == 10.0 and side["trace_compile_seconds"] == 7.0
    assert side["first_step_over_median_seconds"] == 10.0 - 1.5  # the median window over its 2 steps
    assert "first_step_seconds" not in side  # its old meaning differed between contenders


def test_overhead_side_reports_its_first_step_whole():
    config = transformers.LlamaConfig(**{**overhead.CONFIG, **overhead.QUICK})
    for side in ("trainer", "loop"):
        result = overhead.run_side(side, config, overhead.token_blocks(config, True), steps=3)
        assert result["first_step_ready_seconds"] > result["compile_seconds"] > 0, side
        assert result["first_step_over_median_seconds"] < result["first_step_ready_seconds"], side


def test_easydel_peer_labels_easytrains_compile_and_first_step(monkeypatch, tmp_path):
    monkeypatch.setattr(easydel_peer, "run_child", lambda command, timeout: {
        "tokens_per_second": 100.0, "compile_seconds": 3.0, "first_step_seconds": 3.5,
        "trainer_tokens_per_second": 160.0, "trainer_compile_seconds": [1.0], "trainer_peak_rss_mib": [1.0],
        "trainer_first_step_ready_seconds": [1.6], "trainer_first_step_over_median_seconds": [1.2]})
    python = tmp_path / "python"
    python.touch()
    result = easydel_peer.main(["--python", str(python), "--repeats", "1"])
    assert result["easytrain"] == {"trainer_tokens_per_second": 160.0, "trainer_compile_seconds": 1.0,
                                   "trainer_first_step_ready_seconds": 1.6,
                                   "trainer_first_step_over_median_seconds": 1.2, "peak_rss_mib": 1.0}
    assert result["first_step_ready_seconds"] == 3.5 and result["first_step_over_median_seconds"] == 3.0


def test_commands_in_docs_and_docstrings_run_as_modules():
    """`python benchmarks/x.py` fails (ModuleNotFoundError: benchmarks); only the standalone peer runs as a file."""
    texts = [*(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.py")]
    found = [f"{path.name}: {m.group(0)}" for path in texts
             for m in re.finditer(r"python3? benchmarks/(?!peers/)\S+", path.read_text())]
    assert not found


def test_mfu_headline_is_not_a_ratio_to_parity():
    (mfu,) = [h for h in headlines.versus_torch({}) if "MFU" in h.label]
    assert mfu.ratio is False


def test_chart_keeps_its_axis_label(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    calls = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kwargs: calls.append(kwargs))
    rows = [headlines.Headline("x" * 40, "a long label " * 6, 1.2)]
    assert run.draw_chart(rows, tmp_path / "chart.png", "title")
    assert calls[0].get("bbox_inches") == "tight"


def test_lora_ratios_from_unrounded_medians():
    lora = load_script("benchmark_lora", ROOT / "benchmarks" / "lora.py", register=True)
    child = lambda seconds: {"trainable_params": 1, "state_bytes": {"opt_state": 1, "total": 1},  # noqa: E731
                             "train_step_memory": {"step_peak_estimate": 1}, "step_seconds": [seconds],
                             "step_cpu_seconds": [seconds], "peak_rss_mib": 1.0, "device_peak_bytes": None,
                             "load_average_1m": [0.0], **{k: 1.0 for k in (
                                 "peak_rss_steps_mib", "rss_after_imports_mib", "peak_rss_setup_mib",
                                 "peak_rss_before_steps_mib", "rss_before_steps_mib", "setup_seconds",
                                 "compile_seconds", "first_step_seconds")}}
    children = {"full": [child(0.00026)], "lora": [child(0.00028)]}  # 1.0769 here, 1.0 from 4-decimal medians
    sides = {side: lora.aggregate(rows, tokens=1) for side, rows in children.items()}
    ratios = lora.ratios(sides, children)
    assert ratios["step_seconds_of_medians"] == round(0.00028 / 0.00026, 4)
    assert ratios["step_seconds_per_round"]["median"] == ratios["step_seconds_of_medians"]


def test_remat_time_ratio_from_unrounded_medians():
    memory = {policy: {"temp": 10, "peak_estimate": 20} for policy in ("none", "full")}
    rows = remat.policy_rows(memory, {"none": [0.00026], "full": [0.00028]})
    assert rows["full"]["time_over_none"] == round(0.00028 / 0.00026, 3)
