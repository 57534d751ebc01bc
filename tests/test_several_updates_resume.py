"""A trainer that runs several optimizer updates per loop step (docs/custom_trainer.md's `TwoUpdatesPerBatch`)
resumes bit-exactly, after a stop or a SIGKILL, and its checkpoints still refuse a state of another step."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import BaseTrainer, TrainingArguments
from easytrain.checkpoint import SAVED_AT, recorded_updates
from easytrain.errors import CheckpointReadError, TrainedAlreadyError
from easytrain.metrics import merge_all
from easytrain.trainers.resume import check_restored_step
from runs import StopAt, child_env, logged

ROOT = Path(__file__).resolve().parents[1]


class TwoUpdatesPerBatch(BaseTrainer):
    """docs/custom_trainer.md's example: two updates per batch, the schedule sized in updates."""

    def configure_schedule(self, total_steps):
        return super().configure_schedule(2 * total_steps)

    def train_iteration(self, state, batch):
        state, first = self.functions.train_step(state, batch)
        state, second = self.functions.train_step(state, batch)
        return state, merge_all(first, second)


def two_update_args(output_dir, **overrides) -> TrainingArguments:
    """4 iterations (8 updates) checkpointed every 2, with a decaying schedule so the restored update count matters."""
    values = dict(output_dir=str(output_dir), model_config="tiny", max_length=16, train_batch_size=4, max_steps=4,
                  learning_rate=3e-3, lr_scheduler_type="linear", logging_steps=1, eval_strategy="no",
                  save_strategy="steps", save_steps=2, report_to=["jsonl"], disable_progress_bar=True,
                  save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=16)
    return TrainingArguments(**(values | overrides))


def params_of(trainer: BaseTrainer) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.to_pure_dict(nnx.state(trainer.model, nnx.Param)))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run: 4 iterations, checkpoints 2 and 4."""
    output_dir = tmp_path_factory.mktemp("two_updates") / "straight"
    trainer = TwoUpdatesPerBatch(two_update_args(output_dir))
    trainer.train()
    return dict(output_dir=output_dir, params=params_of(trainer), updates=int(trainer.state.step))


def assert_continues_like(resumed: BaseTrainer, output_dir: Path, straight: dict) -> None:
    resumed.train()
    assert int(resumed.state.step) == straight["updates"] == 8
    for key in ("loss", "learning_rate", "grad_norm"):
        assert logged(output_dir, key) == logged(straight["output_dir"], key), key
    for mine, theirs in zip(params_of(resumed), straight["params"], strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_a_stopped_run_resumes_bit_exactly(tmp_path, straight):
    first = TwoUpdatesPerBatch(two_update_args(tmp_path / "run"), callbacks=[StopAt(2)])
    first.train()
    assert int(first.state.step) == 4 and sorted(logged(tmp_path / "run")) == [1, 2]
    with pytest.raises(TrainedAlreadyError, match=r"train\(\) has already run.*step 2.*resume_from_checkpoint"):
        first.train()  # still refused: the loop's own record, not the state's update count, says it ran
    resumed = TwoUpdatesPerBatch(two_update_args(tmp_path / "run", resume_from_checkpoint="latest"))
    assert_continues_like(resumed, tmp_path / "run", straight)


def test_a_run_killed_after_a_checkpoint_resumes_bit_exactly(tmp_path, straight):
    """SIGKILL from inside once checkpoint 2 is complete: no cleanup, no final save."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from easytrain import Callback
from test_several_updates_resume import TwoUpdatesPerBatch, two_update_args

class KillAfterSave(Callback):
    def on_save(self, trainer, step, checkpoint_dir):
        trainer.checkpoint_manager().wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)

TwoUpdatesPerBatch(two_update_args(sys.argv[1]), callbacks=[KillAfterSave()]).train()
""")
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env=child_env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(logged(tmp_path / "run")) == [1, 2]
    resumed = TwoUpdatesPerBatch(two_update_args(tmp_path / "run", resume_from_checkpoint="latest"))
    assert_continues_like(resumed, tmp_path / "run", straight)


def test_a_state_of_another_checkpoint_is_still_refused(tmp_path, straight):
    """Checkpoint 4 holding checkpoint 2's state (its arrays and their digests, so only the step can tell)."""
    run = tmp_path / "run"
    shutil.copytree(straight["output_dir"], run)
    checkpoints = run / "checkpoints"
    for item in ("state", "fingerprint"):
        shutil.rmtree(checkpoints / "4" / item)
        shutil.copytree(checkpoints / "2" / item, checkpoints / "4" / item)
    resume = TwoUpdatesPerBatch(two_update_args(run, max_steps=6, resume_from_checkpoint="latest"))
    with pytest.raises(CheckpointReadError, match=r"checkpoints/4 cannot be read.*train state is at update 4, but "
                                                  r"checkpoint 4 was saved at update 8"):
        resume.setup()


def test_the_recorded_update_count_and_step_are_compared():
    """The record beside the state: its update count against the state's, its step against the directory's (a
    renamed one); a checkpoint written before the record is checked for at least one update per step."""
    state = SimpleNamespace(step=jnp.asarray(8))
    assert recorded_updates({SAVED_AT: {"step": 4, "state_step": 8}}, 4) == 8
    assert recorded_updates({"callbacks": {}}, 4) is None
    with pytest.raises(ValueError, match=r"progress records step 2, but this is the checkpoint of step 4"):
        recorded_updates({SAVED_AT: {"step": 2, "state_step": 8}}, 4)
    with pytest.raises(ValueError, match=r"progress records a damaged saved_at entry"):
        recorded_updates({SAVED_AT: {"step": 4, "state_step": "8"}}, 4)
    check_restored_step(state, 4, 8)
    with pytest.raises(ValueError, match=r"train state is at update 8, but checkpoint 4 was saved at update 6"):
        check_restored_step(state, 4, 6)
    check_restored_step(state, 4, None)  # no record (an older checkpoint): several updates per step are accepted
    with pytest.raises(ValueError, match=r"train state is at step 3, but this is the checkpoint of step 4"):
        check_restored_step(SimpleNamespace(step=jnp.asarray(3)), 4, None)
