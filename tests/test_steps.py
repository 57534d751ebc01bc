"""The pure step functions against independent references (NumPy, a hand-written loop)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from easytrain import LossOutput, TrainState, token_cross_entropy_sums
from easytrain.losses import causal_lm_loss
from easytrain.models import init_model
from easytrain.state import raw_key, split_model
from easytrain.metrics import Last, Max, Mean, Min, Sum, fetch, merge_all, reduce_window
from easytrain.optim import clip_by_global_norm
from easytrain.steps import eval_step, loss_metrics, split_microbatches, train_step, updated

CONFIG = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make_state(tx=None, seed=0) -> TrainState:
    graphdef, params, rest = split_model(init_model(CONFIG, seed=seed))
    return TrainState.create(graphdef=graphdef, params=params, model_state=rest,
                             tx=tx or optax.adamw(1e-2), rng=raw_key(seed))


def ragged_batch(rows=8, length=12, seed=0):
    """Rows of different lengths (right padding) and partially masked targets."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (rows, length + 1)).astype(np.int32)
    lengths = rng.integers(1, length + 1, rows)
    attention = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    loss_mask = attention * (rng.random((rows, length)) < 0.7)
    loss_mask[0] = 0  # one example with no supervised token at all
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": loss_mask.astype(np.float32),
            "attention_mask": attention, "example_id": np.arange(rows, dtype=np.int32)}


def test_cross_entropy_sums_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (3, 5))
    mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    loss_sum, count, correct = token_cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(loss_sum, (nll * mask).sum(), rtol=1e-5)
    assert float(count) == mask.sum()
    assert float(correct) == ((logits.argmax(-1) == targets) * mask).sum()


def test_loss_is_token_normalised_not_mean_of_means():
    state = make_state()
    batch = ragged_batch()
    _, metrics = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2))(state, batch)
    logits = np.asarray(state.model()(batch["input_ids"], attention_mask_BT=batch["attention_mask"]))
    log_probs = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    assert float(metrics["loss"].total / metrics["loss"].count) == pytest.approx(expected, rel=1e-5)
    assert reduce_window([fetch(metrics)])["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("num_micro", [1, 2])
def test_batch_without_supervised_tokens_gives_zero_not_nan(num_micro):
    """Also under gradient accumulation, where the step divides the summed micro-batch gradients by the global
    token count (0 here)."""
    state = make_state()
    batch = ragged_batch()
    batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
    new_state, metrics = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2,
                                                   num_micro=num_micro))(state, batch)
    assert float(metrics["num_tokens"].total) == 0 and float(metrics["loss"].total) == 0.0
    assert int(metrics["skipped_steps"].total) == 0 and float(metrics["grad_norm"].total) == 0.0
    assert reduce_window([fetch(metrics)])["loss"] == 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new_state.params))


@pytest.mark.parametrize("num_micro", [2, 4, 8])
def test_gradient_accumulation_equals_full_batch(num_micro):
    """Loss and updated parameters are identical for any micro-batch split of one global batch."""
    tx = optax.sgd(1.0)  # updates equal the gradients, so parameters compare gradients directly
    batch = ragged_batch()
    step = lambda a: jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1.0,
                                               num_micro=a))
    full_state, full = step(1)(make_state(tx), batch)
    split_state, split = step(num_micro)(make_state(tx), batch)
    assert float(split["num_tokens"].total) == float(full["num_tokens"].total)
    np.testing.assert_allclose(split["loss"].total, full["loss"].total, rtol=1e-6)
    np.testing.assert_allclose(split["accuracy"].total, full["accuracy"].total, rtol=1e-6)
    np.testing.assert_allclose(split["grad_norm"].total, full["grad_norm"].total, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(split_state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    differs = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(full_state.params),
                                                     jax.tree.leaves(make_state(tx).params))]
    assert any(differs), "the update must actually change parameters for this test to mean anything"


@pytest.mark.parametrize("num_micro", [1, 2])
def test_fractional_weights_give_the_same_mean_as_whole_ones(num_micro):
    """Loss weights summing to less than one (importance weights of 0.05) are a weighted mean like any other:
    scaling every weight by 0.05 changes neither the loss nor the update (a count clipped to 1 would)."""
    tx = optax.sgd(1.0)
    batch = ragged_batch()
    light = {**batch, "loss_mask": batch["loss_mask"] * np.float32(0.05) / batch["loss_mask"].sum()}
    step = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1.0, num_micro=num_micro))
    whole_state, whole = step(make_state(tx), batch)
    light_state, light_metrics = step(make_state(tx), light)
    assert float(light_metrics["loss"].count) < 1
    assert reduce_window([fetch(light_metrics)])["loss"] == pytest.approx(reduce_window([fetch(whole)])["loss"],
                                                                          rel=1e-5)
    for a, b in zip(jax.tree.leaves(light_state.params), jax.tree.leaves(whole_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_mean_over_a_fractional_count_is_not_clipped():
    assert Mean(np.float32(0.4), np.float32(0.8)).result() == pytest.approx(0.5)
    assert Mean(np.float32(0.0), np.float32(0.0)).result() == 0.0


def flag_metrics_loss(model, batch, rng, train, frozen):
    """The causal LM loss plus boolean metrics: true on every micro-batch (Sum, Mean) or on some rows (Max, Min)."""
    out = causal_lm_loss(model, batch, rng, train, frozen)
    has_rows = jnp.sum(batch["attention_mask"]) > 0
    first_row = batch["example_id"] == 0
    return out._replace(metrics={**out.metrics, "batches": Sum(has_rows), "has_first_row": Max(jnp.any(first_row)),
                                 "all_first_row": Min(jnp.all(first_row)),
                                 "rows_first": Mean(jnp.sum(first_row), jnp.float32(first_row.size))})


@pytest.mark.parametrize("num_micro", [1, 4])
def test_boolean_metrics_count_and_reduce(num_micro):
    """A boolean metric counts (Sum) and reduces (Max, Min, Mean) like its 0/1 value, over micro-batches and steps."""
    step = jax.jit(functools.partial(train_step, loss_fn=flag_metrics_loss, schedule=lambda s: 1e-2,
                                     num_micro=num_micro))
    state, first = step(make_state(), ragged_batch())
    _, second = step(state, ragged_batch(seed=1))
    logged = reduce_window([fetch(first), fetch(second)])
    assert logged["batches"] == 2 * num_micro
    assert logged["has_first_row"] == 1.0 and logged["all_first_row"] == 0.0
    assert logged["rows_first"] == pytest.approx(2 / 16)


def extreme_metrics_loss(model, batch, rng, train, frozen):
    """A loss that skips the model (quick to compile): the summed target ids over the supervised tokens, plus a
    float Max of negative values and a Min of positive ones per micro-batch; with rows interleaved over 2
    micro-batches (ids 0, 2, .. and 1, 3, ..) the Max is -1 and the Min 7."""
    mask = batch["loss_mask"]
    ids = batch["example_id"].astype(jnp.float32)
    return LossOutput(jnp.sum(batch["targets"] * mask), jnp.sum(mask),
                      {"top": Max(-1 - jnp.min(ids)), "bottom": Min(1 + jnp.max(ids))})


def test_a_log_window_weighs_tokens_keeps_the_last_rate_and_the_extremes():
    """Two accumulated steps with different token counts, logged as one window: the loss is the token-weighted
    mean (not the mean of the step means), the learning rate the second step's, and the float Max/Min of negative
    and positive values are theirs (not the accumulation's start value)."""
    step = jax.jit(functools.partial(train_step, loss_fn=extreme_metrics_loss, schedule=lambda s: 1e-2 * (s + 1),
                                     num_micro=2))
    state, first = step(make_state(), ragged_batch())
    _, second = step(state, ragged_batch(seed=2))
    first, second = fetch(first), fetch(second)
    assert first["loss"].count != second["loss"].count
    logged = reduce_window([first, second])
    tokens = (first["loss"].total + second["loss"].total) / (first["loss"].count + second["loss"].count)
    assert logged["loss"] == pytest.approx(float(tokens), rel=1e-6)
    assert logged["loss"] != pytest.approx((first["loss"].result() + second["loss"].result()) / 2, rel=1e-4)
    assert logged["learning_rate"] == pytest.approx(2e-2)
    assert (logged["top"], logged["bottom"]) == (-1.0, 7.0)


def test_a_log_window_logs_the_mean_of_its_steps_grad_norms():
    """`grad_norm` over a logging window is the mean of its steps' norms, not the last step's (nor their sum)."""
    step = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2))
    state, window = make_state(), []
    for seed in (0, 3, 5):
        state, metrics = step(state, ragged_batch(seed=seed))
        window.append(fetch(metrics))
    norms = [reduce_window([metrics])["grad_norm"] for metrics in window]
    assert len(set(norms)) == 3 and min(norms) > 0
    assert reduce_window(window)["grad_norm"] == pytest.approx(sum(norms) / 3, rel=1e-6)


def test_a_bare_array_metric_is_a_mean_over_the_loss_count():
    """As LossOutput says, a bare array metric is a sum over the loss's own count: logged as that mean, merged over
    micro-batches and steps as one (a Sum would log 4.0, the batches' total)."""
    first = loss_metrics(LossOutput(jnp.float32(6.0), jnp.float32(4.0), {"half_loss": jnp.float32(3.0)}))
    second = loss_metrics(LossOutput(jnp.float32(2.0), jnp.float32(12.0), {"half_loss": jnp.float32(1.0)}))
    assert first["half_loss"].result() == pytest.approx(0.75)
    assert merge_all(first, second)["half_loss"].result() == pytest.approx(4.0 / 16)
    logged = reduce_window([fetch(first), fetch(second)])
    assert logged["half_loss"] == pytest.approx(0.5 * logged["loss"]) == pytest.approx(0.25)


def test_window_reductions_of_plain_numbers():
    assert reduce_window([{"loss": Mean(np.float32(1), np.float32(1))},
                          {"loss": Mean(np.float32(30), np.float32(10))}])["loss"] == pytest.approx(31 / 11)
    assert reduce_window([{"lr": Last(np.float32(v))} for v in (1, 2, 3)])["lr"] == 3.0


def test_microbatches_interleave_rows():
    batch = {"x": np.arange(8)}
    np.testing.assert_array_equal(split_microbatches(batch, 2)["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_apply_gradients_returns_new_state_and_leaves_old_untouched():
    state = make_state()
    before = jax.tree.map(np.asarray, state.params)
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads)
    assert int(new.step) == 1 and int(state.step) == 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception):
        state.step = 5  # frozen dataclass


def test_train_step_donates_the_old_state():
    state = make_state()
    step = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2), donate_argnums=0)
    old_leaves = jax.tree.leaves(state.params)
    new_state, _ = step(state, ragged_batch())
    assert all(leaf.is_deleted() for leaf in old_leaves)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state.params))


@pytest.mark.parametrize("clipping", [None, "first", "after_scaling"])
def test_matches_a_hand_written_training_loop(clipping):
    """Five steps of the library step equal a from-scratch jitted loop on the same weights and data. With
    clipping, easytrain's (given the step's norm) against optax's (which computes its own): first in the
    chain, where the step's norm is the one to clip with, and after a scaling, where it is not."""
    # SGD after the scaling: Adam would hide a clip by the wrong norm (its update ignores the gradient's scale).
    tx = optax.sgd(0.1) if clipping == "after_scaling" else optax.adamw(3e-3, weight_decay=0.01)
    before = [optax.scale(4.0)] if clipping == "after_scaling" else []
    state = make_state(tx if clipping is None else optax.chain(*before, clip_by_global_norm(0.05), tx))
    if clipping is not None:
        tx = optax.chain(*before, optax.clip_by_global_norm(0.05), tx)
    model = state.model()
    params = jax.tree.map(jnp.array, state.params)
    opt_state = tx.init(params)

    @jax.jit
    def reference_step(params, opt_state, batch):
        def loss(params):
            import flax.nnx as nnx
            logits = nnx.merge(state.graphdef, params, state.model_state)(
                batch["input_ids"], attention_mask_BT=batch["attention_mask"])
            logp = jax.nn.log_softmax(logits)
            nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
            return jnp.sum(nll * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    step = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 3e-3))
    del model
    for i in range(5):
        batch = ragged_batch(seed=i)
        params, opt_state, expected = reference_step(params, opt_state, batch)
        state, metrics = step(state, batch)
        assert metrics["loss"].result() == pytest.approx(float(expected), rel=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_non_finite_step_applied_under_ignore_is_not_counted_as_skipped():
    """`skipped_steps` counts updates that were skipped; under 'ignore' the non-finite update is applied."""
    state = make_state()
    poisoned = jax.tree.map(lambda x: x, state.params)
    poisoned["norm"]["scale"] = poisoned["norm"]["scale"].at[0].set(jnp.nan)
    step = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2,
                                     skip_non_finite=False))
    new_state, metrics = step(state.replace(params=poisoned), ragged_batch())
    assert not np.isfinite(float(metrics["loss"].total))
    assert int(metrics["skipped_steps"].total) == 0


def test_non_finite_step_is_skipped():
    state = make_state()
    batch = ragged_batch()
    poisoned = jax.tree.map(lambda x: x, state.params)
    poisoned["norm"]["scale"] = poisoned["norm"]["scale"].at[0].set(jnp.nan)
    bad_state = state.replace(params=poisoned)
    new_state, metrics = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2))(
        bad_state, batch)
    assert int(metrics["skipped_steps"].total) == 1
    assert int(new_state.step) == 1  # the batch was consumed, so step counters advance ...
    for a, b in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(bad_state.opt_state)):
        if np.issubdtype(a.dtype, np.integer):
            assert int(a) == int(b) + 1
        else:
            np.testing.assert_array_equal(a, b)  # ... but no moment was updated
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(bad_state.params)):
        np.testing.assert_array_equal(a, b)  # ... and no parameter


def test_a_skipped_update_lowers_to_its_counters_only():
    """The guard's skip branch hands XLA no optimizer math: only the counters it advances survive lowering
    (a select against the old values would keep the whole update in the program, for XLA to remove)."""
    state = make_state()
    grads = jax.tree.map(jnp.ones_like, state.params)
    norm = jnp.ones((), jnp.float32)
    skipped = jax.jit(functools.partial(updated, keep=False)).lower(state, grads, norm, state.model_state)
    kept = jax.jit(functools.partial(updated, keep=True)).lower(state, grads, norm, state.model_state)
    assert "stablehlo.sqrt" in kept.as_text()  # Adam's denominator: the probe sees an update when there is one
    assert "stablehlo.sqrt" not in skipped.as_text()


def counting(tx: optax.GradientTransformation, calls: list) -> optax.GradientTransformation:
    """`tx`, recording each call of its update (each time a step traces it)."""
    def update(grads, opt_state, params=None):
        calls.append(1)
        return tx.update(grads, opt_state, params)
    return optax.GradientTransformation(tx.init, update)


def test_the_guarded_step_traces_the_optimizer_once():
    """Both branches of the non-finite guard apply the optimizer; the second reuses the first's trace."""
    calls = []
    step = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2))
    step.trace(make_state(counting(optax.adamw(1e-2), calls)), ragged_batch())
    assert len(calls) == 1


def test_clipping_takes_the_norm_the_step_computed(monkeypatch):
    """The default optimizer clips with the step's `grad_norm` instead of computing the norm again."""
    from easytrain import optim
    calls = []
    monkeypatch.setattr(optim, "global_norm", lambda tree: calls.append(1) or optax.tree.norm(tree))
    step = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2))
    step.trace(make_state(optax.chain(clip_by_global_norm(1.0), optax.adamw(1e-2))), ragged_batch())
    assert calls == []


class UnhashableAdam:
    """An optimizer object that cannot be a static argument of `jax.jit`."""
    __hash__ = None

    def __init__(self):
        self.inner = optax.adam(1e-2)

    def init(self, params):
        return self.inner.init(params)

    def update(self, grads, opt_state, params=None):
        return self.inner.update(grads, opt_state, params)


def test_an_unhashable_optimizer_still_steps():
    tx = UnhashableAdam()
    state = make_state(tx)
    reference = make_state(optax.adam(1e-2))
    step = jax.jit(functools.partial(train_step, loss_fn=causal_lm_loss, schedule=lambda s: 1e-2))
    new, _ = step(state, ragged_batch())
    expected, _ = step(reference, ragged_batch())
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_eval_step_ignores_padding_rows():
    state = make_state()
    batch = ragged_batch()
    padded = {k: np.concatenate([v, np.zeros_like(v[:3])]) for k, v in batch.items()}
    a, b = eval_step(state, batch, loss_fn=causal_lm_loss), eval_step(state, padded, loss_fn=causal_lm_loss)
    np.testing.assert_allclose(a["loss"].total, b["loss"].total, rtol=1e-6)
    assert float(a["num_tokens"].total) == float(b["num_tokens"].total)
