"""LoRA's adapters as PEFT builds and runs them, checked on the layers themselves (no training): dropout on the
adapters' input (docs/lora.md), every adapted layer drawing its own `lora_a`, PEFT's gaussian `lora_a` std of 1/r,
and list targets matched by PEFT's rule (the whole name or a dotted suffix, never a substring)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import lora
from easytrain.lora import LoRAConfig, LoRAConfigError, LoRADense
from easytrain.models import init_model
from easytrain.models.layers import Dense
from model_configs import tiny_config


def test_dropout_drops_the_adapters_input_not_their_low_rank_product():
    """y = x @ W + dropout(x) @ A @ B * scaling: the dropped input is redrawn from a twin with the same stream."""
    with nnx.use_eager_sharding(False):  # no mesh: the axes stay metadata, as in apply_lora
        base = Dense(32, 16, axes=("embed", "mlp"), use_bias=False, std=0.1, dtype=jnp.float32,
                     param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        layer = LoRADense(base, rank=4, scaling=2.0, dropout=0.5, rngs=nnx.Rngs(params=1, dropout=2))
    keys = jax.random.split(jax.random.key(3), 3)
    layer.lora_b.set_value(jax.random.normal(keys[0], (4, 16)))
    x = jax.random.normal(keys[1], (8, 32))
    twin = nnx.clone(layer)  # the same dropout stream at the same count: the same mask on the same shape
    dropped = np.asarray(twin.lora_dropout(x))
    assert 0.2 < np.mean(dropped == 0) < 0.8
    a, b, kernel = (np.asarray(v.get_value()) for v in (layer.lora_a, layer.lora_b, layer.kernel))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x) @ kernel + dropped @ a @ b * 2.0, atol=1e-4)


def adapters_a(init_a: str) -> dict[str, np.ndarray]:
    model = lora.apply_lora(init_model(tiny_config()), LoRAConfig(rank=8, alpha=8, init_a=init_a), rngs=nnx.Rngs(0))
    return {name: np.asarray(module.lora_a.get_value()) for name, module in lora.lora_modules(model).items()}


@pytest.mark.parametrize("init_a", ["kaiming_uniform", "gaussian"])
def test_each_adapted_layer_draws_its_own_a(init_a):
    drawn = adapters_a(init_a)
    assert len(drawn) == 2 * 7
    names = sorted(drawn)
    same = [(m, n) for i, m in enumerate(names) for n in names[i + 1:]
            if drawn[m].shape == drawn[n].shape and np.array_equal(drawn[m], drawn[n])]
    assert not same


def test_gaussian_a_has_peft_std_of_one_over_rank():
    values = np.concatenate([a.ravel() for a in adapters_a("gaussian").values()])  # 8,192 draws
    assert abs(values.std() - 1 / 8) < 0.1 / 8  # nn.init.normal_(lora_A, std=1 / r); 1/sqrt(r) would be 0.35
    assert abs(values.mean()) < 0.01


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]


@pytest.mark.parametrize("targets", [["proj"], ["head"], ["_proj"], ["q_proj"], ["self_attn.q_proj"],
                                     ["attn.q_proj"], ["layers.1.mlp.down_proj", "lm_head"]])
def test_list_targets_match_the_names_peft_matches(targets):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(target_modules=targets)
    for name in NAMES:
        assert lora.matches(name, targets) == bool(check_target_module_exists(config, name)), name


def test_a_list_target_that_is_only_part_of_a_name_adapts_nothing():
    model = init_model(tiny_config())
    with pytest.raises(LoRAConfigError, match=r"\['proj'\] match no dense layer"):
        lora.apply_lora(model, LoRAConfig(target_modules=["proj"]))
    lora.apply_lora(model, LoRAConfig(target_modules=["q_proj", "head"], strict_targets=False))
    assert sorted(lora.lora_modules(model)) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
