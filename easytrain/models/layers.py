"""Building blocks of the Llama-family decoder: dense, embedding, RMS norm, attention, MLP and the
decoder layer. Shape suffixes as in ``easytrain.models.llama``.

The residual stream is kept two-dimensional (``x_MD``) so every dense layer is a plain matrix product;
the weight gradient of a 3-D dense contracts two dimensions and is markedly slower on CPU.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from easytrain.indivisible import BlockedAxis
from easytrain.models.attention import DType, apply_rope, grouped_attention
from easytrain.models.dense_product import dense_product
from easytrain.models.families import ArchFeatures, activation_name, attention_heads, features_of, head_dim_of
from easytrain.models.gated import gated_activation
from easytrain.models.kv_cache import LayerCache
from easytrain.models.masks import AttentionMask, attend
from easytrain.sharding import constrain, weight_in_use

Array = jax.Array

# Logical axes of activations for `constrain`, resolved to mesh axes by the parameters' rules (no-ops
# outside a mesh context). M is flattened batch-major, so "batch" splits it like the batch.
RESIDUAL_MD = ("batch", "embed")
HEADS_BTHK = ("batch", None, "heads", None)
MLP_MF = ("batch", "mlp")
LOGITS_MV = ("batch", "vocab")


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes a parameter was annotated with (`out_sharding`); unannotated: all None."""
    return tuple(variable.get_metadata().get("out_sharding") or (None,) * variable[...].ndim)


def in_use(variable: nnx.Variable, dtype: DType) -> Array:
    """A weight cast to the compute dtype and gathered (`easytrain.sharding.weight_in_use`): under FSDP
    the all-gather carries the compute dtype, not the parameter's. A weight that is not an `nnx.Variable` (a
    quantised one from qwix) carries no axes: it is only cast."""
    if not isinstance(variable, nnx.Variable):
        return variable[...].astype(dtype)
    return weight_in_use(variable[...], logical_axes(variable), dtype)


def heads_axis(count: int, field: str) -> BlockedAxis:
    """The logical axis "heads" of a flattened ``heads x head_dim`` dimension of `count` heads (set by the config's
    `field`): tensor parallelism splits it at whole heads or, when it does not divide `count`, not at all, since a
    kernel split mid-head is all-gathered again at every step."""
    return BlockedAxis("heads", count, field)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: DType) -> Array:
    """Normal weights drawn in float32, then cast: the same seed gives the same weights in every ``param_dtype``
    (a bfloat16 model starts from the float32 one's weights, rounded), as random draws in bfloat16 differ."""
    return nnx.initializers.normal(std)(rngs.params(), shape, jnp.float32).astype(dtype)


class Dense(nnx.Module):
    """``x @ kernel + bias`` on 2-D activations, with logical axes on its params."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool,
        std: float,
        dtype: DType,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        kernel = _normal(rngs, (in_features, out_features), std, param_dtype)
        self.kernel = nnx.Param(kernel, out_sharding=axes)
        bias = jnp.zeros((out_features,), param_dtype)
        self.bias = nnx.Param(bias, out_sharding=(axes[1],)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x_MI: Array, *, out_dtype: DType | None = None) -> Array:
        y_MO = dense_product(x_MI.astype(self.dtype), in_use(self.kernel, self.dtype), out_dtype)
        if self.bias is not None:
            y_MO = y_MO + in_use(self.bias, self.dtype).astype(y_MO.dtype)
        return y_MO


class Embedding(nnx.Module):
    """Token embedding table; ``attend`` reuses it as a tied output projection."""

    def __init__(
        self, vocab: int, features: int, *, std: float, dtype: DType, param_dtype: DType, rngs: nnx.Rngs
    ):
        table = _normal(rngs, (vocab, features), std, param_dtype)
        self.embedding = nnx.Param(table, out_sharding=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids_BT: Array) -> Array:
        # The table is gathered along embed first, as FSDP does for every weight (rows looked up in a
        # table split along embed come out split along embed, and would need a full relayout to split
        # by batch), in the compute dtype; the lookup itself reads it upcast to float32 (exact: the
        # values are already rounded), so its gradient, a scatter-add over every token, sums in float32
        # and is rounded once, whatever the parameter dtype (a frequent token adds thousands of terms).
        table_VD = in_use(self.embedding, self.dtype).astype(jnp.float32)
        return jnp.take(table_VD, ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_MD: Array) -> Array:
        """Float32 logits against the embedding table (tied output head)."""
        table_VD = in_use(self.embedding, self.dtype)
        return jnp.dot(x_MD.astype(self.dtype), table_VD.T, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """Root-mean-square norm; statistics in float32 whatever the compute dtype."""

    def __init__(self, features: int, *, eps: float, dtype: DType, param_dtype: DType):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x_MD: Array) -> Array:
        x32_MD = x_MD.astype(jnp.float32)
        variance_M1 = jnp.mean(jnp.square(x32_MD), axis=-1, keepdims=True)
        normed_MD = (x32_MD * jax.lax.rsqrt(variance_M1 + self.eps)).astype(self.dtype)
        return normed_MD * self.scale[...].astype(self.dtype)


def dense_factory(config: transformers.LlamaConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
    return partial(Dense, std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary position embeddings."""

    def __init__(
        self,
        config: transformers.LlamaConfig,
        *,
        features: ArchFeatures | None = None,
        dtype: DType,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        features = features or features_of(config)
        self.num_heads, self.num_kv_heads = attention_heads(config)
        self.head_dim = head_dim_of(config)
        hidden = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = features.qkv_bias, features.o_bias
        dense = dense_factory(config, dtype, param_dtype, rngs)
        q_heads = heads_axis(self.num_heads, "num_attention_heads")
        kv_heads = heads_axis(self.num_kv_heads, "num_key_value_heads")
        self.q_proj = dense(hidden, q_width, axes=("embed", q_heads), use_bias=qkv_bias)
        self.k_proj = dense(hidden, kv_width, axes=("embed", kv_heads), use_bias=qkv_bias)
        self.v_proj = dense(hidden, kv_width, axes=("embed", kv_heads), use_bias=qkv_bias)
        self.o_proj = dense(q_width, hidden, axes=(q_heads, "embed"), use_bias=o_bias)
        head_norm = partial(
            RMSNorm, self.head_dim, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.q_norm = head_norm() if features.qk_norm else None
        self.k_norm = head_norm() if features.qk_norm else None

    def __call__(
        self, x_MD: Array, cos_BTK: Array, sin_BTK: Array, mask_BTS: Array | AttentionMask,
        cache: LayerCache | None = None,
    ) -> Array | tuple[Array, LayerCache]:
        """Attention output; with a ``cache``, keys are every cached slot and the cache comes back too.

        ``mask_BTS`` is dense (``grouped_attention``) or an ``AttentionMask`` (``jax.nn.dot_product_attention``,
        without a cache only).
        """
        length = cos_BTK.shape[1]  # the tables' batch axis is 1 when every row has the same positions
        batch = x_MD.shape[0] // length
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_BTHK = constrain(self.q_proj(x_MD).reshape(batch, length, heads, head_dim), HEADS_BTHK)
        k_BTNK = constrain(self.k_proj(x_MD).reshape(batch, length, kv_heads, head_dim), HEADS_BTHK)
        v_BTNK = constrain(self.v_proj(x_MD).reshape(batch, length, kv_heads, head_dim), HEADS_BTHK)
        if self.q_norm is not None:
            q_BTHK, k_BTNK = self.q_norm(q_BTHK), self.k_norm(k_BTNK)
        q_BTHK = apply_rope(q_BTHK, cos_BTK, sin_BTK)
        k_BTNK = apply_rope(k_BTNK, cos_BTK, sin_BTK)
        q_BTNGK = q_BTHK.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        if cache is None:
            out_BTNGK = attend(q_BTNGK, k_BTNK, v_BTNK, mask_BTS)
        else:
            cache = cache.write(k_BTNK, v_BTNK)
            out_BTNGK = grouped_attention(q_BTNGK, cache.keys_BSNK, cache.values_BSNK, mask_BTS)
        out_MX = out_BTNGK.reshape(batch * length, heads * head_dim)
        out_MD = self.o_proj(constrain(out_MX, ("batch", heads_axis(heads, "num_attention_heads"))))
        return out_MD if cache is None else (out_MD, cache)


class MLP(nnx.Module):
    """Gated feed-forward block: ``down(act(gate(x)) * up(x))``."""

    def __init__(
        self,
        config: transformers.LlamaConfig,
        *,
        features: ArchFeatures | None = None,
        dtype: DType,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        self.hidden_act = activation_name(config)
        bias = (features or features_of(config)).mlp_bias
        hidden, inner = config.hidden_size, config.intermediate_size
        dense = dense_factory(config, dtype, param_dtype, rngs)
        self.gate_proj = dense(hidden, inner, axes=("embed", "mlp"), use_bias=bias)
        self.up_proj = dense(hidden, inner, axes=("embed", "mlp"), use_bias=bias)
        self.down_proj = dense(inner, hidden, axes=("mlp", "embed"), use_bias=bias)

    def __call__(self, x_MD: Array) -> Array:
        hidden_MF = gated_activation(self.hidden_act)(self.gate_proj(x_MD), self.up_proj(x_MD))
        return self.down_proj(constrain(hidden_MF, MLP_MF))


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(
        self,
        config: transformers.LlamaConfig,
        *,
        features: ArchFeatures | None = None,
        dtype: DType,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        norm = partial(
            RMSNorm, config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        features = features or features_of(config)
        self.input_layernorm = norm()
        self.self_attn = Attention(config, features=features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(config, features=features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x_MD: Array, cos_BTK: Array, sin_BTK: Array, mask_BTS: Array | AttentionMask,
        cache: LayerCache | None = None,
    ) -> Array | tuple[Array, LayerCache]:
        if cache is None:
            x_MD = x_MD + self.self_attn(self.input_layernorm(x_MD), cos_BTK, sin_BTK, mask_BTS)
            return x_MD + self.mlp(self.post_attention_layernorm(x_MD))
        attn_MD, cache = self.self_attn(self.input_layernorm(x_MD), cos_BTK, sin_BTK, mask_BTS, cache)
        x_MD = x_MD + attn_MD
        return x_MD + self.mlp(self.post_attention_layernorm(x_MD)), cache
