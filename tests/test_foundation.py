"""Regressions for the trainer's foundation: buffer ownership, non-parameter state, train/eval mode,
skipped steps and the schedule, callback state across a resume."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytrain import BaseTrainer, EarlyStopping, LossOutput, TrainState, TrainingArguments
from easytrain.models import init_model
from easytrain.models.presets import llama_config
from easytrain.state import raw_key, split_model
from easytrain.steps import eval_step, train_step
from easytrain.tasks.arithmetic import build_arithmetic_tokenizer
from runs import StopAt, logged


def tiny_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=8, eval_batch_size=8,
                  max_steps=4, learning_rate=3e-3, logging_steps=1, eval_strategy="no", save_strategy="no",
                  report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                  max_train_samples=64, max_eval_samples=16)
    values.update(overrides)
    return TrainingArguments(**values)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


# ---------------------------------------------------------------------------------------- 1. ownership
def test_a_given_module_stays_valid_and_current_after_training(tmp_path):
    tokenizer = build_arithmetic_tokenizer()
    config = llama_config("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    given = init_model(config, seed=3)
    kept_params = nnx.to_pure_dict(nnx.state(given, nnx.Param))  # a user's own reference to the arrays
    initial = leaves(kept_params)
    trainer = BaseTrainer(tiny_args(tmp_path), model=given, tokenizer=tokenizer)
    handed_out = trainer.model
    configured = trainer._model.model
    trainer.train()
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept_params)), "the caller's buffers were donated"
    for value, before in zip(leaves(kept_params), initial):  # ... and never changed
        np.testing.assert_array_equal(value, before)
    current = leaves(trainer.state.params)
    for module in (given, handed_out, configured, trainer.model):
        now = leaves(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
        assert len(now) == len(current)
        for a, b in zip(now, current):  # valid (not deleted) and current (trained)
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(current, initial)), "training must change weights"


# ------------------------------------------------------------------- 2. non-parameter state, modes
class Regressor(nnx.Module):
    """Linear -> BatchNorm -> Dropout -> Linear: running statistics and a dropout RNG stream."""

    def __init__(self, rngs: nnx.Rngs, features: int = 8):
        self.linear = nnx.Linear(features, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x_BF: jax.Array) -> jax.Array:
        return self.head(self.dropout(self.norm(self.linear(x_BF))))[:, 0]


def regression_loss(model, batch, rng, train, frozen=None):
    error = model(batch["x"]) - batch["y"]
    return LossOutput(jnp.sum(error ** 2), jnp.asarray(error.shape[0], jnp.float32))


def regression_batch(seed=0, rows=8):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(rows, 8)).astype(np.float32), "y": rng.normal(size=(rows,)).astype(np.float32)}


def regression_state(learning_rate=0.0) -> TrainState:
    graphdef, params, rest = split_model(Regressor(nnx.Rngs(0)))
    return TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.sgd(learning_rate),
                             rng=raw_key(0))


def test_train_step_writes_back_running_statistics_and_advances_dropout():
    state = regression_state(learning_rate=0.0)  # parameters never move: only masks can change the loss
    step = jax.jit(functools.partial(train_step, loss_fn=regression_loss, schedule=lambda s: 0.0))
    batch = regression_batch()
    initial_mean = np.asarray(state.model_state["norm"]["mean"])
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"].total))
    assert not np.allclose(np.asarray(state.model_state["norm"]["mean"]), initial_mean), "running mean never moved"
    assert len(set(losses)) == 3, f"the same dropout mask every step: {losses}"


def test_gradient_accumulation_threads_non_parameter_state_through_micro_batches():
    step = lambda micro: jax.jit(functools.partial(train_step, loss_fn=regression_loss, schedule=lambda s: 0.0,
                                                   num_micro=micro))
    state, _ = step(2)(regression_state(), regression_batch())
    count = state.model_state["dropout"]["rngs"]["count"]
    assert int(np.asarray(count)) == 2, "each micro-batch draws its own dropout mask"


def test_eval_step_runs_the_module_in_eval_mode():
    state, _ = jax.jit(functools.partial(train_step, loss_fn=regression_loss, schedule=lambda s: 0.0))(
        regression_state(), regression_batch(seed=1))
    batch = regression_batch(seed=2)
    first = eval_step(state, batch, loss_fn=regression_loss)
    second = eval_step(state, batch, loss_fn=regression_loss)
    assert float(first["loss"].total) == float(second["loss"].total), "evaluation must be deterministic"
    module = nnx.merge(state.graphdef, state.params, state.model_state)
    module.eval()  # running statistics, no dropout: the independent reference
    expected = float(jnp.sum((module(batch["x"]) - batch["y"]) ** 2))
    assert float(first["loss"].total) == pytest.approx(expected, rel=1e-6)
    module.train()
    assert float(jnp.sum((module(batch["x"]) - batch["y"]) ** 2)) != pytest.approx(expected, rel=1e-3)


class RegressionTrainer(BaseTrainer):
    """The regressor through the whole trainer: features from the token blocks, mean next token as target."""

    def compute_loss(self, model, batch, rng, train, frozen):
        x = batch["input_ids"][:, :8].astype(jnp.float32) / 16.0
        return regression_loss(model, {"x": x, "y": batch["targets"].astype(jnp.float32).mean(-1) / 16.0},
                               rng, train)


def regression_trainer(args, **kwargs) -> RegressionTrainer:
    module = Regressor(nnx.Rngs(0))
    module.config = None  # no Hugging Face config: nothing to export
    return RegressionTrainer(args, model=module, tokenizer=build_arithmetic_tokenizer(), **kwargs)


def test_dropout_masks_after_a_resume_equal_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2)
    straight = tiny_args(tmp_path / "straight", **common)
    trainer = regression_trainer(straight)
    trainer.train()
    interrupted = tiny_args(tmp_path / "interrupted", **common)
    regression_trainer(interrupted, callbacks=[StopAt(2)]).train()
    regression_trainer(tiny_args(tmp_path / "interrupted", resume_from_checkpoint="latest", **common)).train()
    reference, resumed = logged(straight.output_dir), logged(interrupted.output_dir)
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(1, 7)] == [reference[s] for s in range(1, 7)]
    assert int(np.asarray(trainer.state.model_state["dropout"]["rngs"]["count"])) == 6


# ----------------------------------------------------------------------- 3. skipped steps, schedule
class Linear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x_BF: jax.Array) -> jax.Array:
        return self.linear(x_BF)[:, 0]


def test_skipped_steps_keep_the_applied_and_logged_learning_rate_equal():
    """Plain SGD applies exactly -lr * grad, so the applied rate can be read off the parameters."""
    schedule = optax.linear_schedule(0.1, 0.5, 6)  # warmup over the whole test
    graphdef, params, rest = split_model(Linear(nnx.Rngs(0)))
    state = TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.sgd(schedule),
                              rng=raw_key(0))
    poison = {1, 2, 4}

    def loss_fn(model, batch, rng, train, frozen):
        out = regression_loss(model, batch, rng, train)
        return out._replace(loss_sum=jnp.where(batch["poison"], jnp.nan, out.loss_sum))

    def mean_loss(params, batch):
        out = regression_loss(nnx.merge(graphdef, params, rest), batch, None, True)
        return out.loss_sum / out.num_tokens

    step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, schedule=schedule))
    for index in range(8):
        batch = regression_batch(seed=index)
        before = jax.tree.map(np.asarray, state.params)
        grads = np.concatenate([g.ravel() for g in leaves(jax.grad(mean_loss)(before, batch))])
        state, metrics = step(state, {**batch, "poison": np.asarray(index in poison)})
        delta = np.concatenate([(a - b).ravel() for a, b in zip(leaves(state.params), leaves(before))])
        assert int(metrics["skipped_steps"].total) == (index in poison)
        assert int(state.step) == index + 1, "a skipped step still consumed its batch"
        counters = [int(c) for c in leaves(state.opt_state) if np.issubdtype(c.dtype, np.integer)]
        assert counters and set(counters) == {index + 1}, f"the optimizer's own step count lags: {counters}"
        assert float(metrics["learning_rate"].value) == pytest.approx(float(schedule(index)), rel=1e-6)
        if index in poison:
            assert not delta.any(), "a skipped step must not move the parameters"
        else:
            applied = -float(delta @ grads) / float(grads @ grads)
            assert applied == pytest.approx(float(metrics["learning_rate"].value), rel=1e-4), index


def test_skipped_steps_keep_adam_moments_and_advance_its_count():
    graphdef, params, rest = split_model(Linear(nnx.Rngs(0)))
    state = TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.adam(1e-2),
                              rng=raw_key(0))
    step = jax.jit(functools.partial(train_step, loss_fn=regression_loss, schedule=lambda s: 1e-2))
    state, _ = step(state, regression_batch(seed=0))
    moments = [leaf for leaf in leaves(state.opt_state) if np.issubdtype(leaf.dtype, np.floating)]
    nan_batch = {**regression_batch(seed=1), "y": np.full((8,), np.nan, np.float32)}
    state, metrics = step(state, nan_batch)
    assert int(metrics["skipped_steps"].total) == 1
    after = [leaf for leaf in leaves(state.opt_state) if np.issubdtype(leaf.dtype, np.floating)]
    for a, b in zip(after, moments):
        np.testing.assert_array_equal(a, b)
    assert {int(c) for c in leaves(state.opt_state) if np.issubdtype(c.dtype, np.integer)} == {2}


# --------------------------------------------------------------------------- 5. callback state
class ScriptedScore:
    """An evaluator whose metric improves once, then only gets worse."""

    def __call__(self, trainer):
        step = int(trainer.state.step)
        return {"eval_score": 10.0 if step == 2 else 10.0 + step}


def test_early_stopping_patience_survives_a_resume(tmp_path):
    common = dict(max_steps=20, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    straight = tiny_args(tmp_path / "straight", **common)
    stopper = EarlyStopping(metric="eval_score", patience=3)
    BaseTrainer(straight, callbacks=[stopper], evaluators=[ScriptedScore()]).train()
    assert max(logged(straight.output_dir)) == 8, "evaluations at 4, 6, 8 fail to improve: stop at 8"
    interrupted = tiny_args(tmp_path / "interrupted", **common)
    BaseTrainer(interrupted, callbacks=[EarlyStopping(metric="eval_score", patience=3), StopAt(5)],
                evaluators=[ScriptedScore()]).train()  # one evaluation without improvement is in the checkpoint
    resumed_stopper = EarlyStopping(metric="eval_score", patience=3)
    BaseTrainer(tiny_args(tmp_path / "interrupted", resume_from_checkpoint="latest", **common),
                callbacks=[resumed_stopper, StopAt(-1)], evaluators=[ScriptedScore()]).train()
    assert max(logged(interrupted.output_dir)) == 8
    assert resumed_stopper.best == 10.0 and resumed_stopper.best_step == 2


# ------------------------------------------------------------------------- 7. reserved metric names
@pytest.mark.parametrize("name", ["loss", "grad_norm", "learning_rate", "skipped_steps"])
def test_a_metric_named_like_a_built_in_one_is_refused(name):
    def loss_fn(model, batch, rng, train, frozen):
        out = regression_loss(model, batch, rng, train)
        return out._replace(metrics={name: out.loss_sum})

    step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, schedule=lambda s: 0.0))
    with pytest.raises(ValueError, match=f"'{name}'.*built-in"):
        step(regression_state(), regression_batch())
    with pytest.raises(ValueError, match=f"'{name}'.*built-in"):
        eval_step(regression_state(), regression_batch(), loss_fn=loss_fn)


class NoisyLinear(nnx.Module):
    """A linear model behind dropout: its RNG stream count is module state the forward pass advances."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(8, 1, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x_BF: jax.Array) -> jax.Array:
        return self.linear(self.dropout(x_BF))[:, 0]


def test_a_skipped_step_keeps_values_and_advances_every_counter():
    """The update is a branch taken only for a finite step; the skipped branch must still advance the step,
    the optimizer's count and the module's RNG stream exactly as a kept step does, and change nothing else."""
    graphdef, params, rest = split_model(NoisyLinear(nnx.Rngs(0)))
    state = TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.adam(1e-2),
                              rng=raw_key(0))
    step = jax.jit(functools.partial(train_step, loss_fn=regression_loss, schedule=lambda s: 1e-2))
    state, _ = step(state, regression_batch(seed=0))
    kept, kept_metrics = step(state, regression_batch(seed=1))
    skipped, metrics = step(state, {**regression_batch(seed=1), "y": np.full((8,), np.nan, np.float32)})
    assert int(kept_metrics["skipped_steps"].total) == 0 and int(metrics["skipped_steps"].total) == 1
    assert int(skipped.step) == int(kept.step) == 2
    def counts(model_state) -> list[int]:  # the RNG stream counts (keys are left as they are)
        return [int(leaf) for leaf in jax.tree.leaves(model_state) if jnp.issubdtype(leaf.dtype, jnp.integer)]

    assert counts(state.model_state) and counts(skipped.model_state) == counts(kept.model_state)
    assert counts(skipped.model_state) == [c + 1 for c in counts(state.model_state)]
    for a, b in zip(leaves((skipped.params, skipped.opt_state)), leaves((state.params, state.opt_state))):
        if np.issubdtype(a.dtype, np.integer):
            assert int(a) == int(b) + 1
        else:
            np.testing.assert_array_equal(a, b)
