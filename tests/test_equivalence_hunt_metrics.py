"""Evaluation metrics agree with the loss they sit beside, whichever path computed the per-token scores (whole
logits or the head a few tokens at a time): `perplexity` is `exp` of the eval loss and `accuracy` the training
step's, also where a collate marks ignored targets as Hugging Face does (-100, or an id past the vocabulary)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytrain.eval_metrics import on_device_metrics
from easytrain.losses import causal_lm_loss
from easytrain.models import init_model
from model_configs import VOCAB, tiny_config


def marked_batch(seed: int = 0) -> dict[str, jax.Array]:
    """Right-padded rows whose unsupervised targets are marked -100 or `VOCAB + 7`, never a real id."""
    rng = np.random.RandomState(seed)
    shape = (3, 9)
    real = (np.arange(shape[1]) < np.array([[9], [6], [2]])).astype(np.int32)
    supervised = real * (rng.rand(*shape) < 0.6)
    marked = np.where(np.arange(shape[1]) % 2 == 0, -100, VOCAB + 7)
    targets = np.where(supervised == 1, rng.randint(0, VOCAB, shape), marked)
    return {k: jnp.asarray(v) for k, v in dict(input_ids=rng.randint(0, VOCAB, shape) * real, targets=targets,
                                               loss_mask=supervised, attention_mask=real).items()}


@pytest.mark.parametrize("chunk_size", [0, 4], ids=["whole logits", "head over 4 tokens at a time"])
def test_perplexity_and_accuracy_agree_with_the_loss_where_ignored_targets_are_marked(chunk_size):
    model, batch = init_model(tiny_config(), seed=0), marked_batch()

    @jax.jit
    def evaluate(batch):
        out = causal_lm_loss(model, batch, None, True, chunk_size=chunk_size)
        return out.loss_sum, out.count, out.metrics["accuracy"], on_device_metrics(
            ("accuracy", "perplexity"), out.predictions, requested=True)

    loss_sum, count, train_accuracy, metrics = evaluate(batch)
    loss = float(loss_sum) / float(count)
    assert math.isfinite(loss) and float(count) == float(np.sum(batch["loss_mask"]))
    assert metrics["perplexity"].result() == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["accuracy"].result() == pytest.approx(train_accuracy.result(), abs=1e-7)
