"""Rematerialisation (`remat_policy`): the same values and gradients as no remat, less activation memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import BaseTrainer, TrainingArguments
from easytrain.models import init_model
from model_configs import tiny_config
from runs import logged


def value_grad_and_temp(policy: str):
    model = init_model(tiny_config(num_hidden_layers=4), seed=0)
    model.remat = policy
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (4, 64)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = jax.jit(jax.value_and_grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)))
    value, grads = fn(params)
    jaxpr = str(jax.make_jaxpr(fn)(params))
    return float(value), grads, fn.lower(params).compile().memory_analysis().temp_size_in_bytes, jaxpr


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_values_and_gradients_with_less_activation_memory(policy):
    value, grads, temp, _ = value_grad_and_temp("none")
    remat_value, remat_grads, remat_temp, jaxpr = value_grad_and_temp(policy)
    assert "remat" in jaxpr or "checkpoint" in jaxpr, "the layers really are rematerialised"
    assert remat_value == pytest.approx(value, rel=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert remat_temp < temp


def test_the_trainer_applies_the_policy_and_trains_the_same_curve(tmp_path):
    def run(policy):
        args = TrainingArguments(output_dir=str(tmp_path / policy), max_length=32, train_batch_size=8, max_steps=3,
                                 logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                                 disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
                                 max_eval_samples=8, remat_policy=policy)
        trainer = BaseTrainer(args)
        trainer.train()
        return trainer, logged(tmp_path / policy)

    plain, plain_losses = run("none")
    remat, remat_losses = run("full")
    assert remat.model.remat == "full" and plain.model.remat == "none"
    np.testing.assert_allclose(list(remat_losses.values()), list(plain_losses.values()), rtol=1e-5)
