"""Smoke test of benchmarks/step_breakdown.py at a tiny size (no timing asserted): every variant of the
trainer's step compiles, runs and is timed, and each left-out part changes the compiled program."""

import json

import pytest

from benchmarks import overhead, step_breakdown


@pytest.mark.usefixtures("collections_of_this_test")  # its gc.collect calls: this test's objects
def test_step_breakdown_smoke(tmp_path):
    out = tmp_path / "breakdown.json"
    result = step_breakdown.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    sides = (*step_breakdown.VARIANTS, "hand_written")
    assert set(result["ms_per_step"]) == set(sides) and all(result["ms_per_step"][s] > 0 for s in sides)
    assert all(result["compile_seconds"][v] > 0 for v in sides)
    assert result["ratio_compile_trainer_over_hand_written"] == round(
        result["compile_seconds"]["trainer"] / result["compile_seconds"]["hand_written"], 4)
    assert set(result["part_ms"]) == set(step_breakdown.PARTS) == {"grad_norm", "accuracy", "guard"}
    assert result["ratio_hand_written_over_trainer"] > 0
    assert isinstance(result["extras_ms"], float) and isinstance(result["residual_ms"], float)


def test_each_variant_leaves_out_its_part():
    """The variants differ from the whole step exactly where they say: the norm is zero, the accuracy metric
    is gone, and without the guard no conditional is left in the program; `no_extras` does all three."""
    import numpy as np
    import transformers

    config = transformers.LlamaConfig(**{**overhead.CONFIG, **overhead.QUICK})
    blocks = np.random.default_rng(0).integers(0, config.vocab_size, (overhead.BATCH * 4, 17)).astype(np.int32)
    trainer = overhead.build_trainer(config, blocks, steps=1, every=1, callbacks=[])
    trainer.setup()
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    metrics, programs = {}, {}
    for name in step_breakdown.VARIANTS:
        step = step_breakdown.variant_step(trainer, name)
        programs[name] = step.lower(trainer.state, batch).as_text()
        _, metrics[name] = step(jax_copy(trainer.state), batch)
    assert float(metrics["trainer"]["grad_norm"].total) > 0 and float(metrics["no_grad_norm"]["grad_norm"].total) == 0
    assert "accuracy" in metrics["trainer"] and "accuracy" not in metrics["no_accuracy"]
    assert "case" in programs["trainer"] and "case" not in programs["no_guard"]
    assert float(metrics["no_guard"]["loss"].total) == float(metrics["trainer"]["loss"].total)
    bare = metrics["no_extras"]
    assert float(bare["grad_norm"].total) == 0 and "accuracy" not in bare and "case" not in programs["no_extras"]


def jax_copy(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.copy, tree)


def test_a_side_compiled_alone_reports_lowering_and_compile_by_wall_clock_and_cpu():
    for side in ("hand_written", "no_extras"):
        result = step_breakdown.main(["--compile_alone", side, "--quick"])
        assert result["side"] == side
        assert all(result[key] > 0 for key in ("lower_seconds", "compile_seconds", "compile_cpu_seconds"))


def test_cold_compiles_alternate_fresh_processes_and_take_medians(monkeypatch):
    """Each side in its own child per repeat, the order reversing every repeat; medians and ratios from them."""
    calls = []
    seconds = {"trainer": [3.0, 5.0, 4.0], "hand_written": [2.0, 2.5, 3.0]}

    def fake_child(module, flag, side, *rest):
        assert (module, flag, rest) == ("benchmarks.step_breakdown", "--compile_alone", ("--quick",))
        calls.append(side)
        compile_seconds = seconds.get(side, [3.5] * 3)[sum(c == side for c in calls) - 1]
        return {"side": side, "lower_seconds": 0.5, "lower_cpu_seconds": 0.5, "compile_seconds": compile_seconds,
                "compile_cpu_seconds": 2 * compile_seconds}

    monkeypatch.setattr(step_breakdown, "child_json", fake_child)
    result = step_breakdown.cold_compiles(3, quick=True)
    sides = [*step_breakdown.VARIANTS, "hand_written"]
    assert calls == sides + sides[::-1] + sides
    assert result["cold_compile_seconds"]["trainer"] == 4.0 and result["cold_compile_seconds"]["hand_written"] == 2.5
    assert result["cold_compile_seconds_all"]["trainer"] == [3.0, 5.0, 4.0]
    assert result["cold_part_compile_seconds"] == {"grad_norm": 0.5, "accuracy": 0.5, "guard": 0.5, "extras": 0.5}
    assert result["cold_ratio_compile_trainer_over_hand_written"] == round(4.5 / 3.0, 4)
    assert result["cold_ratio_compile_cpu_trainer_over_hand_written"] == round(8.0 / 5.0, 4)
