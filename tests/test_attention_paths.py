"""`attention_implementation`: "dot_product_attention" (structured mask) equals "xla" (dense mask), values and
gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import BaseTrainer, TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.data.lm import lm_collate
from easytrain.generation import generate
from easytrain.losses import causal_lm_loss
from easytrain.models import init_model, masks
from easytrain.models.masks import AttentionMask, trailing_lengths
from attention_cases import CASES, LENGTHS, assert_close, case, value_and_grads
from model_configs import right_padded_batch, tiny_config
from runs import logged

@pytest.mark.parametrize("name", CASES)
def test_dot_product_attention_equals_xla_in_float32(name):
    logits, grads = value_and_grads(name, "xla")
    dpa_logits, dpa_grads = value_and_grads(name, "dot_product_attention")
    assert_close(dpa_logits, logits, 1e-5)  # padding positions included
    for a, b in zip(jax.tree.leaves(dpa_grads), jax.tree.leaves(grads), strict=True):
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("name", ["gqa", "right_padding", "packing"])
def test_dot_product_attention_equals_xla_in_bfloat16(name):
    logits, grads = value_and_grads(name, "xla", jnp.bfloat16)
    dpa_logits, dpa_grads = value_and_grads(name, "dot_product_attention", jnp.bfloat16)
    assert_close(dpa_logits, logits, 0.05)
    for a, b in zip(jax.tree.leaves(dpa_grads), jax.tree.leaves(grads), strict=True):
        assert_close(a, b, 0.05)


def test_trailing_lengths_tells_right_padding_from_any_other():
    _, right_BT = right_padded_batch(lengths=LENGTHS)
    lengths_B, trailing = trailing_lengths(jnp.asarray(right_BT))
    assert lengths_B.tolist() == list(LENGTHS) and bool(trailing)
    assert not bool(trailing_lengths(jnp.asarray(right_BT[:, ::-1].copy()))[1])
    assert bool(trailing_lengths(jnp.ones((2, 5), jnp.int32))[1])


def forward_jaxpr(name: str, implementation: str) -> str:
    """The printed jaxpr of one masking case's forward pass."""
    config, ids_BT, inputs = case(name)
    model = init_model(config, seed=0)
    model.attention_implementation = implementation
    return str(jax.make_jaxpr(lambda i, kw: model(i, **kw))(jnp.asarray(ids_BT), jax.tree.map(jnp.asarray, inputs)))


def bool_shapes(name: str, implementation: str) -> set[str]:
    return set(re.findall(r"bool\[([0-9,]*)\]", forward_jaxpr(name, implementation)))


def test_causal_padding_builds_no_batch_by_query_by_key_mask():
    """No boolean [B, T, S] or [B, 1, T, S] in the program: a [B, 1, 1, S] key mask goes in (jax's XLA
    implementation still builds a score-shaped boolean inside, as the dense path's select does; cuDNN, given
    key lengths, builds none)."""
    batch, length = len(LENGTHS), max(LENGTHS)
    dense = {f"{batch},{length},{length}", f"{batch},1,{length},{length}"}
    assert dense & bool_shapes("right_padding", "xla")  # the check can see a dense mask
    assert not dense & bool_shapes("right_padding", "dot_product_attention")


def test_jax_xla_implementation_takes_padding_as_a_key_mask_with_no_conditional():
    """Key lengths buy jax's XLA implementation nothing (it builds the same boolean from them), so only cuDNN
    gets them, behind a `lax.cond` per layer; on XLA:GPU a conditional blocks the host on its predicate."""
    assert "cond[" not in forward_jaxpr("right_padding", "dot_product_attention")


def test_token_blocks_attend_with_the_causal_structure_alone(monkeypatch):
    """Token blocks are never padded (an eval padding row is weighed out by `loss_mask`), so their batch carries
    no attention mask: the model attends causally with no key mask, and on cuDNN's path with no per-layer
    `lax.cond` (a host sync on XLA:GPU, twice per layer per step)."""
    monkeypatch.setattr(masks, "passes_key_lengths", lambda kernel: True)  # cuDNN's path, on a CPU
    batch = lm_collate(np.random.default_rng(0).integers(0, 64, (2, 9)), np.array([0, -1]))
    model = init_model(tiny_config(), seed=0)
    model.attention_implementation = "dot_product_attention"
    jaxpr = str(jax.make_jaxpr(lambda b: causal_lm_loss(model, b, None, True).loss_sum)(
        jax.tree.map(jnp.asarray, batch)))
    assert "cond[" not in jaxpr and "bool[2,1,1,8]" not in jaxpr


@pytest.mark.parametrize("name", ["right_padding", "left_padding"])
def test_the_key_length_branch_cudnn_takes_equals_xla(name, monkeypatch):
    """cuDNN's path (lengths when every row's padding is trailing, else a mask) run through jax's XLA
    implementation, the only one on a CPU."""
    logits, grads = value_and_grads(name, "xla")
    monkeypatch.setattr(masks, "passes_key_lengths", lambda kernel: True)
    assert "cond[" in forward_jaxpr(name, "dot_product_attention")  # the branch is really taken here
    dpa_logits, dpa_grads = value_and_grads(name, "dot_product_attention")
    assert_close(dpa_logits, logits, 1e-5)
    for a, b in zip(jax.tree.leaves(dpa_grads), jax.tree.leaves(grads), strict=True):
        assert_close(a, b, 1e-5)


def test_the_structure_is_a_pytree_with_a_static_window():
    mask = AttentionMask(jnp.ones((2, 3)), None, window=4)
    leaves, treedef = jax.tree.flatten(mask)
    assert len(leaves) == 1 and jax.tree.unflatten(treedef, leaves).window == 4


def test_decoding_is_unchanged_by_the_implementation():
    """decode keeps the dense path: greedy generation is unchanged, its prefill equals the structured forward."""
    model = init_model(tiny_config(initializer_range=0.2), seed=0)
    prompts, mask = right_padded_batch(lengths=(6, 3))
    plain = generate(model, prompts, mask, max_new_tokens=5)
    model.attention_implementation = "dot_product_attention"
    np.testing.assert_array_equal(generate(model, prompts, mask, max_new_tokens=5), plain)
    logits, _ = model.decode(jnp.asarray(prompts), model.init_cache(2, 6), attention_mask_BT=jnp.asarray(mask))
    forward = model(jnp.asarray(prompts), attention_mask_BT=jnp.asarray(mask))
    real = mask.astype(bool)  # a padding query attends nothing in decode, the real keys before it in the forward
    np.testing.assert_allclose(logits[real], forward[real], atol=1e-5)


def test_a_bad_implementation_is_refused():
    with pytest.raises(ArgumentError, match="attention_implementation"):
        TrainingArguments(output_dir="unused", attention_implementation="flash").validate()
    model = init_model(tiny_config(), seed=0)
    model.attention_implementation = "flash"
    with pytest.raises(ValueError, match="xla, dot_product_attention"):
        model(jnp.zeros((1, 4), jnp.int32))


def test_a_module_without_the_attribute_is_refused_a_non_default_value(tmp_path):
    class Plain(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(3))

    args = TrainingArguments(output_dir=str(tmp_path), attention_implementation="dot_product_attention")
    with pytest.raises(ArgumentError, match="attention_implementation"):
        BaseTrainer(args).adapt_module(Plain())


def test_the_trainer_applies_it_and_trains_the_same_curve(tmp_path):
    def run(implementation):
        args = TrainingArguments(output_dir=str(tmp_path / implementation), max_length=32, train_batch_size=8,
                                 max_steps=3, logging_steps=1, eval_strategy="no", save_strategy="no",
                                 report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                                 max_train_samples=64, max_eval_samples=8, attention_implementation=implementation)
        trainer = BaseTrainer(args)
        trainer.train()
        return trainer, logged(tmp_path / implementation)

    plain, plain_losses = run("xla")
    dpa, dpa_losses = run("dot_product_attention")
    assert dpa.model.attention_implementation == "dot_product_attention"
    assert plain.model.attention_implementation == "xla"
    np.testing.assert_allclose(list(dpa_losses.values()), list(plain_losses.values()), rtol=1e-5)
