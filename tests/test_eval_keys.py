"""Which PRNG key the loss gets: in training `fold_in(step_rng, micro_index)` whatever the accumulation, in eval a key
per eval batch from a stream of its own, never a training step's key."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytrain import BaseTrainer, LossOutput, TrainingArguments, TrainState
from easytrain.metrics import Max, Min
from easytrain.state import raw_key, split_model
from easytrain.steps import eval_step, train_step


def make_state(step: int = 0) -> TrainState:
    graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    state = TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.sgd(0.1), rng=raw_key(3))
    return state.replace(step=jnp.asarray(step, jnp.int32))


def probe_loss(model, batch, rng, train, frozen):
    """A loss that reports the first uniform draw of its key (smallest and largest over batches)."""
    loss_sum = jnp.sum(model(batch["x"]))
    u = jax.random.uniform(rng)
    return LossOutput(loss_sum, jnp.float32(batch["x"].shape[0]), {"u_min": Min(u), "u_max": Max(u)})


BATCH = {"x": np.ones((4, 2), np.float32)}


class Probe(BaseTrainer):
    """Eight training rows and twelve eval rows (three batches of four) of a one-layer module, `probe_loss`."""

    def prepare_datasets(self):
        return {"x": np.ones((8, 2), np.float32)}, {"x": np.ones((12, 2), np.float32)}

    def prepare_eval_dataset(self, dataset):
        return dataset

    def collate(self, rows, example_ids):
        return {"x": np.asarray(rows["x"])}

    def create_module(self):
        return nnx.Linear(2, 1, rngs=nnx.Rngs(0))

    def compute_loss(self, model, batch, rng, train, frozen):
        return probe_loss(model, batch, rng, train, frozen)


def probe_arguments(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), report_to=["none"], disable_progress_bar=True,
                             train_batch_size=4, eval_batch_size=4, max_steps=1, save_strategy="no",
                             save_pretrained_at_end=False)


def drawn(metrics) -> float:
    return float(metrics["u_min"].value)


def uniform(key) -> float:
    return float(jax.random.uniform(key))


@pytest.mark.parametrize("num_micro", [1, 2])
def test_the_loss_gets_the_step_key_folded_with_the_micro_index_whatever_the_accumulation(num_micro):
    state = make_state(step=5)
    step = jax.jit(functools.partial(train_step, loss_fn=probe_loss, schedule=lambda s: 0.1, num_micro=num_micro))
    _, metrics = step(state, BATCH)
    expected = [uniform(jax.random.fold_in(state.step_rng(), i)) for i in range(num_micro)]
    assert float(metrics["u_min"].value) == pytest.approx(min(expected))
    assert float(metrics["u_max"].value) == pytest.approx(max(expected))
    assert uniform(state.step_rng()) not in expected  # a draw of the user's own from step_rng() never repeats it


def test_each_eval_batch_gets_a_key_of_its_own():
    state = make_state(step=5)
    evaluate = jax.jit(functools.partial(eval_step, loss_fn=probe_loss))
    draws = [drawn(evaluate(state, BATCH, np.int32(index))) for index in range(3)]
    assert len(set(draws)) == 3, draws
    assert evaluate._cache_size() == 1  # the batch index is traced: one compile for every batch


def test_the_eval_key_is_from_its_own_stream_never_a_training_key():
    state = make_state(step=5)
    got = drawn(jax.jit(functools.partial(eval_step, loss_fn=probe_loss))(state, BATCH, np.int32(0)))
    assert got == pytest.approx(uniform(jax.random.fold_in(state.stream_rng("eval"), 0)))
    train_keys = [jax.random.fold_in(make_state(step=s).step_rng(), i) for s in (5, 6) for i in range(4)]
    assert got not in [uniform(key) for key in train_keys]


def test_the_eval_batch_index_defaults_to_the_first_batch():
    state = make_state()
    evaluate = jax.jit(functools.partial(eval_step, loss_fn=probe_loss))
    assert drawn(evaluate(state, BATCH)) == drawn(evaluate(state, BATCH, np.int32(0)))


def test_a_trainer_gives_every_eval_batch_its_own_key_with_one_compile(tmp_path):
    """Needs the eval batch index from BaseTrainer.configure_functions and loop.evaluate_batches."""
    trainer = Probe(probe_arguments(tmp_path))
    first, again = trainer.evaluate(), trainer.evaluate()
    state = trainer.state
    draws = [uniform(jax.random.fold_in(state.stream_rng("eval"), j)) for j in range(3)]  # 12 rows, 3 batches
    assert first["eval_u_min"] == pytest.approx(min(draws)) and first["eval_u_max"] == pytest.approx(max(draws))
    assert first == again  # the same weights: the same keys in every pass
    assert trainer.functions.eval_step.__wrapped__._cache_size() == 1


def test_an_eval_step_of_state_and_batch_from_configure_functions_still_evaluates(tmp_path):
    """A subclass's own eval step, written as the protocol's `(state, batch)`, is called as written (no index)."""
    from easytrain.protocol import ConfiguredFunctions

    class OwnEval(Probe):
        def configure_functions(self):
            own = functools.partial(eval_step, loss_fn=self.compute_loss)
            return ConfiguredFunctions(train_step=super().configure_functions().train_step,
                                       eval_step=self.compile_step(lambda state, batch: own(state, batch)))

    metrics = OwnEval(probe_arguments(tmp_path)).evaluate()
    assert metrics["eval_u_min"] == metrics["eval_u_max"]  # its one key (batch index 0) for every batch
