"""`attention_implementation="splash"` (jax's Pallas TPU kernel, interpreted on CPU) equals "xla" at every real
token, values and gradients; padding and packing go in as segment ids, not as a mask array."""

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_cases import CASES, assert_close, case, real_tokens, value_and_grads
from easytrain import BaseTrainer, TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.models import init_model, splash
from easytrain.models.attention import attention_mask, grouped_attention
from model_configs import tiny_config


@pytest.mark.parametrize("name", CASES)
def test_splash_equals_xla_at_real_tokens_in_float32(name):
    logits, grads = value_and_grads(name, "xla", real_only=True)
    splash_logits, splash_grads = value_and_grads(name, "splash", real_only=True)
    real = real_tokens(name)
    assert_close(np.asarray(splash_logits)[real], np.asarray(logits)[real], 1e-5)
    for a, b in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(grads), strict=True):
        assert_close(a, b, 1e-5)


def test_splash_equals_xla_in_bfloat16():
    logits, grads = value_and_grads("packing", "xla", jnp.bfloat16, real_only=True)
    splash_logits, splash_grads = value_and_grads("packing", "splash", jnp.bfloat16, real_only=True)
    real = real_tokens("packing")
    assert_close(np.asarray(splash_logits)[real], np.asarray(logits)[real], 0.05)
    for a, b in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(grads), strict=True):
        assert_close(a, b, 0.05)


def test_several_blocks_and_a_length_that_is_no_multiple_of_the_block():
    """600 tokens: two 512-token blocks after padding to 1024; a window, packed documents, inner padding."""
    batch, length, kv_heads, group, head_dim = 1, 600, 1, 2, 8
    q, k, v = (jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32) for seed, shape in
               enumerate([(batch, length, kv_heads, group, head_dim)] + [(batch, length, kv_heads, head_dim)] * 2))
    segments_BT = np.repeat(np.arange(3), [250, 300, 50])[None]
    real_BT = np.ones((batch, length), np.int32)
    real_BT[:, 100:110] = 0  # inside the first document: later tokens of it must not see these
    dense_BTS = attention_mask(batch, length, jnp.asarray(real_BT), jnp.asarray(segments_BT), 129)
    weights = jnp.asarray(np.random.RandomState(3).randn(batch, length, kv_heads, group, head_dim)
                          * real_BT[:, :, None, None, None], jnp.float32)

    def reference(q, k, v):
        return jnp.sum(grouped_attention(q, k, v, dense_BTS) * weights)

    def kernel(q, k, v):
        segments = splash.splash_segments(batch, length, jnp.asarray(real_BT), jnp.asarray(segments_BT))
        return jnp.sum(splash.attend_splash(q, k, v, segments, 129) * weights)

    expected, expected_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(q, k, v)
    actual, actual_grads = jax.value_and_grad(kernel, argnums=(0, 1, 2))(q, k, v)
    assert splash.block_size(length) == 512
    np.testing.assert_allclose(actual, expected, rtol=1e-4)
    for a, b in zip(actual_grads, expected_grads, strict=True):
        assert_close(a, b, 1e-5)


def test_padding_and_packing_build_no_batch_by_query_by_key_mask():
    config, ids_BT, inputs = case("packing")
    batch, length = ids_BT.shape
    dense = {f"{batch},{length},{length}", f"{batch},1,{length},{length}"}

    def bool_shapes(implementation: str) -> set[str]:
        model = init_model(config, seed=0)
        model.attention_implementation = implementation
        jaxpr = jax.make_jaxpr(lambda i, kw: model(i, **kw))(jnp.asarray(ids_BT), jax.tree.map(jnp.asarray, inputs))
        return set(re.findall(r"bool\[([0-9,]*)\]", str(jaxpr)))

    assert dense & bool_shapes("dot_product_attention")  # the check can see a dense mask
    assert not dense & bool_shapes("splash")


def test_padding_segment_is_apart_from_every_document():
    segments = splash.splash_segments(1, 4, jnp.asarray([[1, 1, 0, 1]]), jnp.asarray([[0, 0, 0, 1]]))
    assert segments.tolist() == [[0, 0, splash.PADDING_SEGMENT, 1]]
    assert splash.splash_segments(2, 3, None, None).tolist() == [[0] * 3] * 2


def test_kernels_are_built_once_per_shape():
    splash.splash_kernel.cache_clear()
    for _ in range(2):
        value_and_grads("gqa", "splash")
    info = splash.splash_kernel.cache_info()
    assert info.currsize == 1 and info.hits >= 1, info


def test_gpus_are_refused_naming_the_field_and_the_fix():
    with pytest.raises(ArgumentError, match="attention_implementation.*dot_product_attention"):
        splash.check_backend("gpu")
    splash.check_backend("tpu")
    splash.check_backend("cpu")
    arguments = TrainingArguments(output_dir="unused", attention_implementation="splash")
    assert arguments.attention_implementation == "splash"


def test_scanned_layers_run_the_kernel_too():
    config, ids_BT, inputs = case("packing")
    outputs = {}
    for implementation, scanned in (("xla", False), ("splash", True)):
        model = init_model(config, seed=0)
        model.attention_implementation, model.scan_layers = implementation, scanned
        outputs[implementation] = nnx.jit(lambda m, i, kw: m(i, **kw))(model, jnp.asarray(ids_BT),
                                                                       jax.tree.map(jnp.asarray, inputs))
    real = real_tokens("packing")
    assert_close(np.asarray(outputs["splash"])[real], np.asarray(outputs["xla"])[real], 1e-5)


def test_the_trainer_refuses_it_on_a_gpu_before_building_the_model(tmp_path):
    trainer = BaseTrainer(TrainingArguments(output_dir=str(tmp_path), attention_implementation="splash"))
    trainer.mesh = SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")]))
    with pytest.raises(ArgumentError, match="attention_implementation"):
        trainer.adapt_module(init_model(tiny_config(), seed=0))
