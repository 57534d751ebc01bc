"""BaseTrainer end to end on the embedded arithmetic task at tiny size."""

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from easytrain import BaseTrainer, Callback, TrainerProtocol, TrainingArguments
from easytrain.checkpoint import CheckpointManager
from easytrain.placement import abstract_state
from test_foundation import regression_trainer


def tiny_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=8, eval_batch_size=8,
                  max_steps=8, learning_rate=3e-3, logging_steps=1, eval_strategy="no", save_strategy="no",
                  report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                  max_train_samples=64, max_eval_samples=16)
    values.update(overrides)
    return TrainingArguments(**values)


def logged(output_dir, split="train", key="loss") -> dict[int, float]:
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line[key] for line in lines if line["split"] == split and key in line}


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.events: list[str] = []
        self.stop_at = stop_at

    def on_train_begin(self, trainer): self.events.append("train_begin")
    def on_train_end(self, trainer): self.events.append("train_end")
    def on_log(self, trainer, step, logs): self.events.append(f"log:{step}")
    def on_evaluate(self, trainer, step, metrics): self.events.append(f"evaluate:{step}")
    def on_save(self, trainer, step, checkpoint_dir): self.events.append(f"save:{step}")

    def on_step_end(self, trainer, step):
        self.events.append(f"step:{step}")
        if step == self.stop_at:
            trainer.should_stop = True


def test_base_trainer_satisfies_the_protocol(tmp_path):
    trainer = BaseTrainer(tiny_args(tmp_path))
    assert isinstance(trainer, TrainerProtocol)
    for name in ("dataset_train", "dataset_eval", "model", "state", "dtype", "param_dtype", "optimizer",
                 "scheduler"):
        assert getattr(trainer, name) is not None, name


def test_loss_decreases_on_the_embedded_task(tmp_path):
    args = tiny_args(tmp_path, max_steps=60, logging_steps=10, max_train_samples=None, warmup_steps=5)
    logs = BaseTrainer(args).train()
    losses = logged(args.output_dir)
    assert losses[10] > losses[60] + 0.5, losses
    assert logs["loss"] == pytest.approx(losses[60])
    assert np.isfinite(logs["tokens_per_second"]) and logs["skipped_steps"] == 0


def test_callback_events_in_order(tmp_path):
    recorder = Recorder()
    args = tiny_args(tmp_path, max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=2,
                     save_strategy="steps", save_steps=4)
    BaseTrainer(args, callbacks=[recorder]).train()
    assert recorder.events == ["train_begin", "step:1", "log:2", "evaluate:2", "step:2", "step:3", "log:4",
                               "evaluate:4", "step:4", "save:4", "train_end"]


def test_compiles_train_and_eval_steps_once_across_epochs(tmp_path, caplog):
    args = tiny_args(tmp_path, max_steps=-1, num_train_epochs=3, max_train_samples=24,
                     eval_strategy="epoch", logging_steps=2)
    trainer = BaseTrainer(args)
    trainer.setup()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        trainer.train()
        trainer.evaluate()
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert trainer.dataloaders.total_steps == 3 * trainer.dataloaders.steps_per_epoch == 9
    assert sum("train_step" in m for m in compiled) == 1, compiled
    assert sum("eval_step" in m for m in compiled) == 1, compiled


def test_evaluate_does_not_depend_on_eval_batch_size(tmp_path):
    results = [BaseTrainer(tiny_args(tmp_path / str(size), eval_batch_size=size, max_eval_samples=13)).evaluate()
               for size in (1, 3, 8)]
    for other in results[1:]:
        assert other["eval_num_tokens"] == results[0]["eval_num_tokens"] == 13 * 32
        assert other["eval_loss"] == pytest.approx(results[0]["eval_loss"], rel=1e-6)
        assert other["eval_perplexity"] == pytest.approx(results[0]["eval_perplexity"], rel=1e-6)


def test_checkpoint_restores_identical_parameters_and_optimizer_state(tmp_path):
    args = tiny_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    trainer = BaseTrainer(args)
    trainer.train()
    manager = CheckpointManager(Path(args.output_dir) / "checkpoints")
    assert manager.latest_step() == 3
    target = abstract_state(trainer.state_shardings, trainer.state)
    restored, data_state, run_info = manager.restore(3, abstract_state=target)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(trainer.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored.step) == 3 and run_info["arguments"]["seed"] == args.seed
    assert data_state


def test_resume_continues_the_step_count_and_loss_curve(tmp_path):
    common = dict(max_steps=8, save_strategy="steps", save_steps=4)
    straight = tiny_args(tmp_path / "straight", **common)
    BaseTrainer(straight).train()
    interrupted = tiny_args(tmp_path / "interrupted", **common)
    BaseTrainer(interrupted, callbacks=[Recorder(stop_at=3)]).train()  # stops at 3 and checkpoints it
    resumed = tiny_args(tmp_path / "interrupted", resume_from_checkpoint="latest", **common)
    BaseTrainer(resumed).train()
    reference, continued = logged(straight.output_dir), logged(interrupted.output_dir)
    assert sorted(continued) == list(range(1, 9))  # no duplicated or missing steps
    for step in range(1, 9):
        assert continued[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


def test_save_pretrained_round_trip(tmp_path):
    from easytrain.models import load_pretrained

    trainer = BaseTrainer(tiny_args(tmp_path, max_steps=2))
    trainer.train()
    directory = trainer.save_pretrained(tmp_path / "export")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    reloaded = load_pretrained(directory)
    from flax import nnx

    expected = nnx.to_pure_dict(nnx.state(trainer.model, nnx.Param))
    actual = nnx.to_pure_dict(nnx.state(reloaded, nnx.Param))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_custom_loss_by_overriding_compute_loss(tmp_path):
    from easytrain import LossOutput, causal_lm_loss

    class DoubledLoss(BaseTrainer):
        def compute_loss(self, model, batch, rng, train, frozen):
            out = causal_lm_loss(model, batch, rng, train, frozen)
            return LossOutput(2.0 * out.loss_sum, out.count, out.metrics)

    plain = BaseTrainer(tiny_args(tmp_path / "a", max_steps=1)).train()
    doubled = DoubledLoss(tiny_args(tmp_path / "b", max_steps=1)).train()
    assert doubled["loss"] == pytest.approx(2 * plain["loss"], rel=1e-6)


@pytest.mark.parametrize("max_steps, logging_steps", [(3, 3), (6, 2)])
def test_non_finite_stop_policy_checkpoints_the_finite_state_and_names_the_step(tmp_path, max_steps, logging_steps):
    """With logging_steps 2 the log of step 2 is deferred until step 3 is dispatched: the state checkpointed is
    then the one after step 3, so it is saved as step 3 (with its data position), and a resume continues it."""
    from easytrain import LossOutput, NonFiniteLossError, causal_lm_loss

    class NaNLoss(BaseTrainer):
        def compute_loss(self, model, batch, rng, train, frozen):
            out = causal_lm_loss(model, batch, rng, train, frozen)
            return LossOutput(out.loss_sum * np.nan, out.count, out.metrics)

    args = tiny_args(tmp_path, max_steps=max_steps, logging_steps=logging_steps, non_finite_policy="stop",
                     save_strategy="steps", save_steps=100)
    trainer = NaNLoss(args)
    initial = jax.tree.map(np.asarray, trainer.state.params)
    with pytest.raises(NonFiniteLossError, match="at step 1 .*example ids.*after step 3 was checkpointed"):
        trainer.train()
    # the window is logged, then the checkpointed step as a window of its own: every step up to it, once
    checkpointed = {3: 1} if logging_steps < 3 else {}
    assert logged(args.output_dir, key="skipped_steps") == {logging_steps: logging_steps, **checkpointed}
    manager = CheckpointManager(Path(args.output_dir) / "checkpoints")
    assert manager.latest_step() == 3
    restored, data_state, _ = manager.restore(3, abstract_state=abstract_state(trainer.state_shardings, trainer.state))
    assert int(restored.step) == 3 and data_state["step"] == 3  # saved under its own step
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(a), b)  # every non-finite update was skipped
    resumed = BaseTrainer(tiny_args(tmp_path, max_steps=max_steps + 1, resume_from_checkpoint="latest"))
    resumed.train()
    assert int(resumed.state.step) == max_steps + 1


def test_load_best_model_at_end_restores_the_best_checkpoint_while_the_metric_degrades(tmp_path):
    """The whole checkpointed state comes back, the module's other state too: the regressor's BatchNorm running
    statistics and dropout RNG count moved on after step 2, and restoring its params alone would keep them."""
    scores = iter([3.0, 2.0, 1.0])  # best first, then worse at every evaluation
    args = tiny_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                     save_steps=2, save_total_limit=1, metric_for_best_model="eval_score", greater_is_better=True,
                     load_best_model_at_end=True, max_eval_samples=8)
    trainer = regression_trainer(args, evaluators=[lambda trainer: {"eval_score": next(scores)}])
    logs = trainer.train()
    manager = CheckpointManager(Path(args.output_dir) / "checkpoints")
    assert manager.all_steps() == [2, 6], "the newest (6) and the best (2) survive save_total_limit=1"
    assert logs["best_step"] == 2 and int(trainer.state.step) == 2
    target = abstract_state(trainer.state_shardings, trainer.state).checkpointed()
    best, state = manager.restore(2, abstract_state=target)[0], trainer.state.checkpointed()
    assert jax.tree.structure(best) == jax.tree.structure(state) and jax.tree.leaves(state.model_state)
    for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(state)):
        np.testing.assert_array_equal(key_free(a), key_free(b))


def key_free(leaf) -> np.ndarray:
    """`leaf` as a NumPy array, a typed PRNG key (a dropout stream's) as its key data."""
    return np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)


def test_the_schedule_spans_the_optimizer_updates_under_gradient_accumulation(tmp_path):
    """With 2 micro-batches a step the logged rates are those of the run without accumulation: warmup 2, linear
    decay over the 4 updates (a schedule sized in micro-batches would decay over 8). The small regressor keeps the
    run cheap; the trainer sizes the schedule whatever the module."""
    args = tiny_args(tmp_path, max_steps=4, max_train_samples=32, gradient_accumulation_steps=2, learning_rate=1e-2,
                     lr_scheduler_type="linear", warmup_steps=2)
    regression_trainer(args).train()
    assert logged(args.output_dir, key="learning_rate") == pytest.approx({1: 0.0, 2: 5e-3, 3: 1e-2, 4: 5e-3})


def test_trains_another_family_from_a_config_file(tmp_path):
    config = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    path = tmp_path / "qwen3.json"
    path.write_text(json.dumps(config))
    trainer = BaseTrainer(tiny_args(tmp_path, model_config=str(path), max_steps=2))
    logs = trainer.train()
    assert trainer.model_config.model_type == "qwen3" and np.isfinite(logs["loss"])
    assert "q_norm" in trainer.state.params["layers"][0]["self_attn"]


def test_non_finite_skip_policy_counts_and_logs_skipped_updates(tmp_path):
    from easytrain import LossOutput, causal_lm_loss

    class NaNOnSomeSteps(BaseTrainer):
        def compute_loss(self, model, batch, rng, train, frozen):
            out = causal_lm_loss(model, batch, rng, train, frozen)
            bad = jax.random.bits(rng) % 2 == 0  # a deterministic coin per step (the step RNG)
            return LossOutput(jax.numpy.where(bad, np.nan, out.loss_sum), out.count, out.metrics)

    args = tiny_args(tmp_path, max_steps=6, non_finite_policy="skip")
    NaNOnSomeSteps(args).train()
    skipped = logged(args.output_dir, key="skipped_steps")
    assert set(skipped.values()) == {0, 1} and sorted(skipped) == list(range(1, 7)), skipped


def test_a_second_train_call_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    """A second `train()` would restart the step count and the data at the run's start while the state kept its
    updates, log the same steps twice and skip the final checkpoint (its step already exists)."""
    trainer = BaseTrainer(tiny_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3))
    trainer.train()
    params = jax.tree.map(np.asarray, trainer.state.params)
    with pytest.raises(RuntimeError, match=r"train\(\) has already run.*step 3.*resume_from_checkpoint"):
        trainer.train()
    assert int(trainer.state.step) == 3
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trainer.state.params)):
        np.testing.assert_array_equal(a, b)
    assert sorted(logged(tmp_path / "run")) == [1, 2, 3]


def test_a_checkpoint_off_the_logging_cadence_ends_a_logging_window(tmp_path):
    """Steps after the last log and up to a checkpoint are logged with it: a run killed after the save and resumed
    would otherwise never log them, and its next record would cover fewer steps than the straight run's."""
    import shutil

    straight = tiny_args(tmp_path / "a", max_steps=8, logging_steps=4, save_strategy="steps", save_steps=6,
                         save_total_limit=None)
    BaseTrainer(straight).train()
    assert sorted(logged(straight.output_dir)) == [4, 6, 8]
    resumed = tiny_args(tmp_path / "b", max_steps=8, logging_steps=4, save_strategy="steps", save_steps=6,
                        save_total_limit=None, resume_from_checkpoint="latest")
    shutil.copytree(straight.output_dir, resumed.output_dir)
    shutil.rmtree(Path(resumed.output_dir) / "checkpoints" / "8")  # as if killed after step 7
    BaseTrainer(resumed).train()
    for key in ("loss", "num_tokens"):
        assert logged(resumed.output_dir, key=key) == logged(straight.output_dir, key=key)


def test_a_stopped_run_without_checkpoints_logs_the_steps_since_its_last_log(tmp_path):
    """save_strategy 'no' and a callback's stop after step 3 of a 4-step logging window: steps 1-3 are logged at the
    end, and their loss is what train() returns, as with a final checkpoint (which would log them first)."""
    from runs import StopAt

    args = tiny_args(tmp_path, max_steps=8, logging_steps=4, save_strategy="no")
    logs = BaseTrainer(args, callbacks=[StopAt(3)]).train()
    losses = logged(args.output_dir)
    assert sorted(losses) == [3] and logs["loss"] == losses[3]


def test_a_run_without_evaluation_data_writes_no_empty_eval_records(tmp_path):
    """eval_strategy 'steps' (the default) with nothing to evaluate wrote `{"step": 2, "split": "eval"}` records,
    empty CSV rows and an empty `on_evaluate` every eval_steps."""
    class TrainOnly(BaseTrainer):
        def prepare_datasets(self):
            return super().prepare_datasets()[0], None

    recorder = Recorder()
    args = tiny_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, eval_metrics=[])
    TrainOnly(args, callbacks=[recorder]).train()
    assert not logged(args.output_dir, split="eval", key="step")
    assert not [event for event in recorder.events if event.startswith("evaluate")]
