"""A trainer whose `configure_optimizer` builds its own optimizer (docs/custom_trainer.md) decides its state's layout
itself: the settings that switch a part of the default optimizer's state (clipping, Adafactor's decay, SGD's momentum)
or pick the default's optimizer may mean nothing to it. A resume refuses them by name only where the default
`configure_optimizer` built the state on both sides (each checkpoint's run_info records it); elsewhere the state
tree comparison of the restore catches a real mismatch."""

import json
from pathlib import Path

import optax
import pytest

from easytrain import ArgumentError, BaseTrainer
from easytrain.checkpoint import CheckpointMismatchError
from easytrain.checkpoint_items import RUN_INFO_FILE
from easytrain.trainers.resume import check_resumable
from runs import args_for, snapshot
from test_resume_inputs import resume

#: The run_info key recording whether `BaseTrainer.configure_optimizer` built the checkpoint's optimizer state.
FLAG = "default_optimizer"


class NoClip(BaseTrainer):
    """An optimizer that never clips, whatever max_grad_norm says."""

    def configure_optimizer(self, schedule):
        return optax.adamw(schedule)


def stored_run_info(output_dir: Path, step: int) -> dict:
    return json.loads((Path(output_dir) / "checkpoints" / str(step) / RUN_INFO_FILE).read_text())


@pytest.fixture(scope="module")
def no_clip_run(tmp_path_factory):
    """2 steps of `NoClip` under the default max_grad_norm (1.0), checkpointed at step 2."""
    output_dir = tmp_path_factory.mktemp("no_clip") / "run"
    NoClip(args_for(output_dir, max_steps=2)).train()
    return output_dir


def test_a_custom_optimizer_resumes_with_clipping_switched_off(no_clip_run):
    """It was refused: "the checkpoint's optimizer state was saved with gradient clipping", which NoClip never
    chains; its state has the same tree under either value."""
    trainer = NoClip(args_for(no_clip_run, max_steps=4, resume_from_checkpoint="latest", max_grad_norm=0.0))
    trainer.setup()
    assert int(trainer.state.step) == 2


def test_a_custom_optimizer_resumes_with_another_optimizer_argument_it_does_not_read(no_clip_run):
    trainer = NoClip(args_for(no_clip_run, max_steps=4, resume_from_checkpoint="latest", optimizer="lion"))
    trainer.setup()
    assert int(trainer.state.step) == 2


def test_each_checkpoint_records_whether_the_default_optimizer_built_its_state(no_clip_run, run_copy):
    """BaseTrainer's configure_optimizer (kept by a subclass that does not override it) builds from the arguments."""
    assert stored_run_info(no_clip_run, 2)[FLAG] is False
    assert stored_run_info(run_copy, 4)[FLAG] is True


def test_the_default_optimizer_is_still_refused_by_name_before_any_array(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=r"^max_grad_norm: .*saved with gradient clipping.*checkpoint 1\.0 vs now "
                                            r"0\.0"):
        resume(run_copy, max_grad_norm=0.0).setup()  # a subclass keeping the default configure_optimizer
    with pytest.raises(ArgumentError, match=r"^optimizer: .*checkpoint 'adamw' vs now 'lion'"):
        resume(run_copy, optimizer="lion").setup()
    assert snapshot(run_copy) == before


def test_a_custom_optimizer_resuming_a_default_one_is_left_to_the_state_comparison(run_copy):
    """The default state chains clipping before AdamW; NoClip's does not: the restore lists the optimizer-state keys
    that differ and blames other optimizer settings first, not a clipping switch NoClip does not have."""
    before = snapshot(run_copy)
    with pytest.raises(CheckpointMismatchError, match=r"another optimizer or optimizer settings(.|\n)*opt_state"):
        NoClip(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest", max_grad_norm=0.0)).setup()
    assert snapshot(run_copy) == before


def run_info(flag: bool | None, **arguments) -> dict:
    """A run_info with `arguments`, and the flag unless None (a checkpoint written before it was recorded)."""
    info = {"format_version": 1, "model_config": None,
            "arguments": dict(seed=0, train_batch_size=4, optimizer="adamw", max_grad_norm=1.0) | arguments}
    return info if flag is None else {**info, FLAG: flag}


@pytest.mark.parametrize("stored, now, refused", [
    (True, True, True), (None, True, True),  # the default on both sides (an older checkpoint: as this run's)
    (False, False, False), (None, False, False), (True, False, False), (False, True, False),
])
def test_the_switches_are_compared_only_where_the_default_optimizer_built_both_states(stored, now, refused):
    for change in ({"max_grad_norm": 0.0}, {"optimizer": "sgd"}):
        name = next(iter(change))
        if refused:
            with pytest.raises(ArgumentError, match=rf"^{name}: "):
                check_resumable(run_info(stored), run_info(now, **change))
        else:
            assert check_resumable(run_info(stored), run_info(now, **change)) == []


def test_param_dtype_is_refused_whatever_builds_the_optimizer():
    """The stored arrays' dtypes follow param_dtype, not the optimizer."""
    with pytest.raises(ArgumentError, match=r"^param_dtype: "):
        check_resumable(run_info(False, param_dtype="float32"), run_info(False, param_dtype="bfloat16"))
