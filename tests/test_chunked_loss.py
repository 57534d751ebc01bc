"""Chunked cross-entropy (`loss_chunk_size`): the values and gradients of the full logits, without holding them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import BaseTrainer, TrainingArguments
from easytrain.chunked_loss import (chunked_cross_entropy_sums, chunked_target_logps, chunked_token_scores, dense_head,
                                    tied_head, token_scores)
from easytrain.errors import ArgumentError
from easytrain.eval_metrics import Predictions, TokenScores, accuracy, perplexity
from easytrain.lora import LoRAConfig, apply_lora
from easytrain.losses import causal_lm_loss, token_cross_entropy_sums
from easytrain.models import init_model
from model_configs import tiny_config
from runs import logged

M, D, V = 21, 16, 96  # 21 tokens: chunks of 8 leave a short last one, chunks of 7 do not


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x_MD = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    weight_DV = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    targets_M = jnp.asarray(rng.integers(0, V, M))
    mask_M = jnp.asarray(rng.integers(0, 2, M)).at[:3].set(0)
    return x_MD, weight_DV, targets_M, mask_M


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 8, 64])
def test_sums_and_gradients_equal_the_full_logits(tied, chunk_size):
    x_MD, weight_DV, targets_M, mask_M = inputs()
    weight = weight_DV.T if tied else weight_DV
    make_head = tied_head if tied else dense_head

    def full(x, w):
        return token_cross_entropy_sums(make_head(w)(x), targets_M, mask_M)

    def chunked(x, w):
        return chunked_cross_entropy_sums(make_head(w), x, targets_M, mask_M, chunk_size)

    for got, want in zip(chunked(x_MD, weight), full(x_MD, weight)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(full(x_MD, weight)[1]) == float(jnp.sum(mask_M)) < M  # the mask really drops tokens
    grad = lambda fn: jax.grad(lambda x, w: fn(x, w)[0], (0, 1))(x_MD, weight)
    for got, want in zip(grad(chunked), grad(full)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [5, 32])
def test_target_logps_equal_the_log_softmax_gather(chunk_size):
    x_MD, weight_DV, targets_M, _ = inputs(1)
    weights_M = jnp.asarray(np.random.default_rng(2).normal(size=M), jnp.float32)

    def full(x, w):
        return jnp.take_along_axis(jax.nn.log_softmax(x @ w), targets_M[:, None], axis=-1)[:, 0]

    chunked = lambda x, w: chunked_target_logps(dense_head(w), x, targets_M, chunk_size)
    np.testing.assert_allclose(chunked(x_MD, weight_DV), full(x_MD, weight_DV), rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda x, w: jnp.sum(fn(x, w) * weights_M), (0, 1))(x_MD, weight_DV) for fn in (chunked, full)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_token_scores_give_the_eval_metrics_of_the_logits():
    x_MD, weight_DV, targets_M, mask_M = inputs(3)
    nll_M, correct_M = chunked_token_scores(dense_head(weight_DV), x_MD, targets_M, 8)
    scored, logits = TokenScores(nll_M, correct_M, mask_M), Predictions(x_MD @ weight_DV, targets_M, mask_M)
    for metric in (accuracy, perplexity):
        for got, want in zip(metric(scored), metric(logits)):
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_hit_is_numpys_argmax_even_among_tied_logits():
    """The first of several equal largest logits is the prediction, as `np.argmax` picks it."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 10)).astype(np.float32)
    logits[0:3] = 0.0  # all tied (a zero-initialised head): only target 0 is a hit
    logits[3:6, [2, 7]] = 5.0  # two tied maxima: target 2 is a hit, target 7 is not
    logits[6] = -np.inf  # nothing finite: index 0 is still numpy's argmax
    targets = np.array([0, 4, 9, 2, 7, 5, 0, *rng.integers(0, 10, 5)], np.int32)
    rows = np.arange(7, 12)
    logits[rows, targets[7:]] = logits[7:].max(-1) + 1.0  # plain hits ...
    logits[9, targets[9]] -= 2.0  # ... and one miss
    _, correct = token_scores(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_array_equal(correct, (logits.argmax(-1) == targets).astype(np.float32))
    assert list(np.asarray(correct[:7])) == [1, 0, 0, 1, 0, 0, 1]


def test_one_float_apart_is_no_tie_and_the_cross_entropy_and_its_gradient_are_float64s():
    """The hit and the log-sum-exp share one max over logits with the earlier ones raised a float: an earlier
    logit one float below the largest is not a tie, an equal one is, a later equal one is not; the
    cross-entropy and its gradient match a float64 NumPy log-softmax, for large and -inf logits too."""
    below_two = np.nextafter(np.float32(2.0), np.float32(0.0))
    logits = np.array([[1.0, 1.0, 0.5, -3.0], [below_two, 2.0, 0.0, 1.0], [0.5, 3.0, 3.0, -1.0],
                       [1e4, 1e4 - 1.0, -np.inf, 9e3], [-np.inf, 0.0, -np.inf, -np.inf], [-2.0, 7.5, 7.5, 7.5]],
                      np.float32)
    targets = np.array([1, 1, 1, 0, 1, 3], np.int32)
    nll, correct = token_scores(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_array_equal(correct, (logits.argmax(-1) == targets).astype(np.float32))
    assert list(np.asarray(correct)) == [0, 1, 1, 1, 1, 0]

    exact = logits.astype(np.float64)
    log_softmax = exact - (exact.max(-1, keepdims=True) + np.log(np.exp(exact - exact.max(-1, keepdims=True))
                                                               .sum(-1, keepdims=True)))
    np.testing.assert_allclose(nll, -log_softmax[np.arange(6), targets], rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda l: token_scores(l, jnp.asarray(targets))[0].sum())(jnp.asarray(logits))
    expected = np.exp(log_softmax) - np.eye(4)[targets]
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)


def batch(seed=0, shape=(3, 7)):
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 2, shape)
    mask[0] = 0  # a row with nothing supervised
    return {"input_ids": jnp.asarray(rng.integers(0, 128, shape)), "targets": jnp.asarray(rng.integers(0, 128, shape)),
            "loss_mask": jnp.asarray(mask), "attention_mask": jnp.ones(shape, jnp.int32).at[2, 5:].set(0)}


def loss_and_grads(model, chunk_size):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out = causal_lm_loss(nnx.merge(graphdef, p, rest), batch(), None, True, chunk_size=chunk_size)
        return out.loss_sum, (out.count, out.metrics["accuracy"])

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("head", ["untied", "tied", "lora"])
def test_the_model_loss_and_every_parameter_gradient_equal_the_full_logits(head):
    model = init_model(tiny_config(tie_word_embeddings=head == "tied"), seed=0)
    if head == "lora":
        apply_lora(model, LoRAConfig(rank=4, target_modules=["lm_head", "q_proj"]), rngs=1)
        for _, module in nnx.iter_modules(model):  # B = 0 at init would hide the adapters' part of the head
            if hasattr(module, "lora_b"):
                module.lora_b.set_value(jax.random.normal(jax.random.key(2), module.lora_b.shape) * 0.1)
    (full, (count, acc)), full_grads = loss_and_grads(model, 0)
    (chunked, (chunked_count, chunked_acc)), grads = loss_and_grads(model, 5)  # 21 tokens: a short last chunk
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    assert chunked_count == count and chunked_acc.total == acc.total
    leaves, full_leaves = jax.tree.leaves_with_path(grads), jax.tree.leaves(full_grads)
    assert any("lora_b" in jax.tree_util.keystr(path) for path, _ in leaves) == (head == "lora")
    for (path, got), want in zip(leaves, full_leaves, strict=True):
        # Within 1e-5 of the tensor's largest entry: sums taken in another order round differently per CPU
        # (an AVX2 machine put 3 of 8192 embedding entries 1.6e-5 apart relatively, 1.3e-6 absolutely).
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_the_compiled_loss_and_gradient_hold_no_float32_token_by_vocabulary_buffer():
    tokens, hidden, vocab = 1024, 64, 32768
    full_bytes = tokens * vocab * 4  # 128 MiB
    shapes = (jax.ShapeDtypeStruct((tokens, hidden), jnp.float32), jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
              jax.ShapeDtypeStruct((tokens,), jnp.int32), jax.ShapeDtypeStruct((tokens,), jnp.float32))

    def temp_bytes(sums):
        step = jax.jit(jax.grad(lambda x, w, t, m: sums(x, w, t, m)[0], (0, 1)))
        return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(lambda x, w, t, m: token_cross_entropy_sums(dense_head(w)(x), t, m))
    chunked = temp_bytes(lambda x, w, t, m: chunked_cross_entropy_sums(dense_head(w), x, t, m, 128))
    assert full >= full_bytes, full  # the full path really materialises [M, V] in float32 ...
    assert chunked < full_bytes // 2, (chunked, full)  # ... the chunked one does not


def run_args(tmp_path, name, **overrides):
    values = dict(output_dir=str(tmp_path / name), max_length=24, train_batch_size=4, max_steps=3, logging_steps=1,
                  eval_strategy="steps", eval_steps=3, save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=32, max_eval_samples=6,
                  eval_batch_size=4)
    return TrainingArguments(**(values | overrides))


def test_a_trainer_run_logs_the_same_losses_and_eval_metrics(tmp_path):
    for name, chunk_size in (("full", 0), ("chunked", 7)):  # 4 x 24 tokens: not a multiple of 7
        BaseTrainer(run_args(tmp_path, name, loss_chunk_size=chunk_size)).train()
    np.testing.assert_allclose(list(logged(tmp_path / "chunked").values()), list(logged(tmp_path / "full").values()),
                               rtol=1e-5)
    for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
        chunked, full = logged(tmp_path / "chunked", key, "eval"), logged(tmp_path / "full", key, "eval")
        assert full and chunked.keys() == full.keys(), key
        np.testing.assert_allclose(list(chunked.values()), list(full.values()), rtol=1e-5, err_msg=key)


def test_a_dpo_run_logs_the_same_losses_and_log_probs(tmp_path):
    from easytrain.trainers.dpo import DPOTrainer

    for name, chunk_size in (("full", 0), ("chunked", 6)):
        DPOTrainer(run_args(tmp_path, name, loss_chunk_size=chunk_size, eval_strategy="no",
                            learning_rate=1e-2)).train()
    for key in ("loss", "logps/chosen", "logps/rejected", "logits/chosen", "rewards/margins"):
        chunked, full = logged(tmp_path / "chunked", key), logged(tmp_path / "full", key)
        assert full, key
        np.testing.assert_allclose(list(chunked.values()), list(full.values()), rtol=1e-5, atol=1e-6, err_msg=key)


class NoHead(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((4, 4)))

    def __call__(self, ids_BT, **_):
        return jnp.zeros(ids_BT.shape + (4,))


def test_bad_settings_fail_at_set_up_naming_loss_chunk_size(tmp_path):
    with pytest.raises(ArgumentError, match="loss_chunk_size"):
        run_args(tmp_path, "negative", loss_chunk_size=-1)
    with pytest.raises(ArgumentError, match="loss_chunk_size.*no hidden_states or logits_from_hidden"):
        BaseTrainer(run_args(tmp_path, "nohead", loss_chunk_size=8), model=NoHead()).setup()
    lora = dict(lora_rank=2, lora_dropout=0.1, lora_target_modules=["lm_head"])
    with pytest.raises(ArgumentError, match="loss_chunk_size.*LoRA dropout"):
        BaseTrainer(run_args(tmp_path, "dropout", loss_chunk_size=8, **lora)).setup()


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_a_masked_target_outside_the_vocabulary_weighs_nothing(chunk_size):
    """A custom collate may mark ignored targets as Hugging Face does (-100, or any id past the vocabulary); where
    the mask is 0 they must add nothing, not a NaN that poisons the sum (the step would be skipped as non-finite)."""
    x_MD, weight_DV, targets_M, mask_M = inputs()
    ignored = mask_M == 0
    marked_M = jnp.where(ignored, jnp.where(jnp.arange(M) % 2 == 0, -100, V + 7), targets_M)
    logits_MV = np.asarray(x_MD @ weight_DV, np.float64)
    log_probs = logits_MV - np.log(np.sum(np.exp(logits_MV - logits_MV.max(-1, keepdims=True)), -1,
                                          keepdims=True)) - logits_MV.max(-1, keepdims=True)
    expected = -np.sum(np.take_along_axis(log_probs, np.asarray(targets_M)[:, None], 1)[:, 0] * np.asarray(mask_M))
    if chunk_size is None:
        total, count, _ = token_cross_entropy_sums(x_MD @ weight_DV, marked_M, mask_M)
    else:
        total, count, _ = chunked_cross_entropy_sums(dense_head(weight_DV), x_MD, marked_M, mask_M, chunk_size)
    assert float(count) == float(np.sum(mask_M))
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
