"""Rematerialisation (`remat_policy`): the same values and gradients as no remat, less activation memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import BaseTrainer, TrainingArguments
from easytrain.models import init_model
from jaxprs import all_equations
from model_configs import tiny_config
from runs import logged


def value_grads_and_kept_bytes(policy: str, scan: bool = False):
    """The loss, its gradients, and the bytes autodiff keeps from the forward pass for the backward (the arrays
    `jax.vjp`'s closure holds: parameters, and activations unless the policy recomputes them)."""
    model = init_model(tiny_config(num_hidden_layers=4), seed=0, scan_layers=scan)
    model.remat = policy
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (4, 64)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p, rest)(ids) ** 2)

    fn = jax.jit(jax.value_and_grad(loss))
    value, grads = fn(params)
    jaxpr = jax.make_jaxpr(fn)(params).jaxpr
    kept = sum(leaf.nbytes for leaf in jax.tree.leaves(jax.vjp(loss, params)[1]))
    return float(value), grads, kept, jaxpr


def rematerialised(jaxpr) -> bool:
    """Whether a `jax.checkpoint` with a policy (nnx.remat's too) is among the equations, those inside a scan's body
    included; the gated MLP's own policy-free checkpoint of its activation is there under every policy."""
    return any(eqn.primitive.name == "remat2" and eqn.params.get("policy") is not None
               for eqn in all_equations(jaxpr))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
@pytest.mark.parametrize("policy, at_most", [("full", 0.2), ("dots", 0.4)])
def test_remat_gives_the_same_values_and_gradients_and_keeps_less_for_the_backward_pass(policy, at_most, scan):
    """Measured where the policy acts, in what autodiff keeps: XLA:CPU's buffer assignment does not turn the
    recomputation into a lower scratch peak (docs/benchmarks.md, "Rematerialisation"), so the compiled program's
    temporaries on CPU cannot show it. With scan_layers the policy wraps the scan's body instead of each layer."""
    value, grads, kept, plain_jaxpr = value_grads_and_kept_bytes("none", scan)
    remat_value, remat_grads, remat_kept, jaxpr = value_grads_and_kept_bytes(policy, scan)
    assert rematerialised(jaxpr) and not rematerialised(plain_jaxpr), "the layers really are rematerialised"
    assert remat_value == pytest.approx(value, rel=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert remat_kept < at_most * kept


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
