"""examples/reinforce.py: the online policy-gradient example learns its toy reward, and a run resumed from a
checkpoint samples and updates exactly as the uninterrupted run (the rollout key is a stream of the train state)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from script_modules import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reinforce.py"


@pytest.fixture(scope="module")
def example():
    return load_script("reinforce", SCRIPT)


def test_the_reward_rises_and_a_resume_continues_the_same_run(example, tmp_path):
    straight = example.main(["--output_dir", str(tmp_path / "straight"), "--max_steps", "4"])
    assert 0 <= straight["reward"] <= 1 and np.isfinite(straight["loss"])

    first = example.ReinforceTrainer(example.arguments(str(tmp_path / "stopped"), 2, save_steps=2,
                                                       overwrite_output_dir=True))
    first_logs = first.train()
    resumed = example.ReinforceTrainer(example.arguments(str(tmp_path / "stopped"), 4,
                                                         resume_from_checkpoint="latest"))
    logs = resumed.train()
    assert logs["reward"] == straight["reward"] and logs["loss"] == straight["loss"]
    assert logs["reward"] > first_logs["reward"], "the policy moves toward the rewarded token"
    assert int(resumed.state.step) == 4 and jax.tree.leaves(resumed.state.params)


def test_it_says_how_to_run_it():
    assert "python examples/reinforce.py" in SCRIPT.read_text()


def test_every_update_runs_at_the_full_learning_rate(example, tmp_path):
    """The example asks for a constant rate without warmup: its first rollout is not spent at learning rate 0, and
    the curve does not depend on --max_steps (else a run extended with --resume would differ from a longer one)."""
    from easytrain.optim import build_schedule

    for steps in (20, 40):
        schedule = build_schedule(example.arguments(str(tmp_path), steps), steps)
        np.testing.assert_allclose([float(schedule(update)) for update in range(steps)], 1e-2, rtol=1e-6)
