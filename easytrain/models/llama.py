"""Llama-family causal language model in Flax NNX.

One code path for Llama, Mistral, Qwen2 and Qwen3: ``features_of(config)`` turns the
config's family into a few switches (biases, q/k norm, per-layer sliding windows).
Built from a ``transformers`` config with the Hugging Face parameter layout
(rotate-half RoPE, flattened ``[D, heads * head_dim]`` projections), so Hugging
Face checkpoints load with plain transposes and no permutation.

Shape suffixes: B batch, T query length, S key length, M = B*T flattened tokens,
D hidden size, F MLP size, V vocabulary, H query heads, N key/value heads,
G = H/N query heads per key/value head, K head dimension.

The residual stream is kept two-dimensional (``x_MD``) so every dense layer is a
plain matrix product; the weight gradient of a 3-D dense contracts two
dimensions and is markedly slower on CPU.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from easytrain.models.attention import (
    DType,
    apply_rope,
    attention_mask,
    cached_attention_mask,
    grouped_attention,
    rope_tables,
)
from easytrain.models.families import (
    ACTIVATIONS,
    ArchFeatures,
    ConfigError,
    activation_name,
    features_of,
    head_dim_of,
    rope_theta,
)
from easytrain.models.remat import layer_runner
from easytrain.models.kv_cache import KVCache, LayerCache, advance, init_cache, with_layers
from easytrain.sharding import constrain

Array = jax.Array

# Logical axes of activations for `constrain`, resolved to mesh axes by the parameters' rules (no-ops
# outside a mesh context). M is flattened batch-major, so "batch" splits it like the batch.
RESIDUAL_MD = ("batch", "embed")
HEADS_BTHK = ("batch", None, "heads", None)
HEADS_MX = ("batch", "heads")
MLP_MF = ("batch", "mlp")
LOGITS_MV = ("batch", "vocab")


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: DType) -> Array:
    return nnx.initializers.normal(std)(rngs.params(), shape, dtype)


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
        y_MO = jnp.dot(
            x_MI.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            preferred_element_type=out_dtype,
        )
        if self.bias is not None:
            y_MO = y_MO + self.bias[...].astype(y_MO.dtype)
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
        # Gather the embed axis first, as FSDP does for every weight: rows looked up in a table split
        # along embed come out split along embed, and would need a full relayout to split by batch.
        table_VD = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table_VD, ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_MD: Array) -> Array:
        """Float32 logits against the embedding table (tied output head)."""
        table_VD = self.embedding[...].astype(self.dtype)
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


def _dense_factory(config: transformers.LlamaConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
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
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.num_attention_heads ({self.num_heads}) must be a multiple of "
                f"config.num_key_value_heads ({self.num_kv_heads})."
            )
        hidden = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = features.qkv_bias, features.o_bias
        dense = _dense_factory(config, dtype, param_dtype, rngs)
        self.q_proj = dense(hidden, q_width, axes=("embed", "heads"), use_bias=qkv_bias)
        self.k_proj = dense(hidden, kv_width, axes=("embed", "heads"), use_bias=qkv_bias)
        self.v_proj = dense(hidden, kv_width, axes=("embed", "heads"), use_bias=qkv_bias)
        self.o_proj = dense(q_width, hidden, axes=("heads", "embed"), use_bias=o_bias)
        head_norm = partial(
            RMSNorm, self.head_dim, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.q_norm = head_norm() if features.qk_norm else None
        self.k_norm = head_norm() if features.qk_norm else None

    def __call__(
        self, x_MD: Array, cos_BTK: Array, sin_BTK: Array, mask_BTS: Array, cache: LayerCache | None = None
    ) -> Array | tuple[Array, LayerCache]:
        """Attention output; with a ``cache``, keys are every cached slot and the cache comes back too."""
        batch, length = cos_BTK.shape[:2]
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
            out_BTNGK = grouped_attention(q_BTNGK, k_BTNK, v_BTNK, mask_BTS)
        else:
            cache = cache.write(k_BTNK, v_BTNK)
            out_BTNGK = grouped_attention(q_BTNGK, cache.keys_BSNK, cache.values_BSNK, mask_BTS)
        out_MD = self.o_proj(constrain(out_BTNGK.reshape(batch * length, heads * head_dim), HEADS_MX))
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
        dense = _dense_factory(config, dtype, param_dtype, rngs)
        self.gate_proj = dense(hidden, inner, axes=("embed", "mlp"), use_bias=bias)
        self.up_proj = dense(hidden, inner, axes=("embed", "mlp"), use_bias=bias)
        self.down_proj = dense(inner, hidden, axes=("mlp", "embed"), use_bias=bias)

    def __call__(self, x_MD: Array) -> Array:
        gate_MF = ACTIVATIONS[self.hidden_act](self.gate_proj(x_MD))
        return self.down_proj(constrain(gate_MF * self.up_proj(x_MD), MLP_MF))


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
        self, x_MD: Array, cos_BTK: Array, sin_BTK: Array, mask_BTS: Array, cache: LayerCache | None = None
    ) -> Array | tuple[Array, LayerCache]:
        if cache is None:
            x_MD = x_MD + self.self_attn(self.input_layernorm(x_MD), cos_BTK, sin_BTK, mask_BTS)
            return x_MD + self.mlp(self.post_attention_layernorm(x_MD))
        attn_MD, cache = self.self_attn(self.input_layernorm(x_MD), cos_BTK, sin_BTK, mask_BTS, cache)
        x_MD = x_MD + attn_MD
        return x_MD + self.mlp(self.post_attention_layernorm(x_MD)), cache


@dataclasses.dataclass(frozen=True)
class _StaticConfig:
    """Hashable holder for the config: NNX graph definitions serve as jit cache keys."""

    key: str
    config: transformers.PretrainedConfig = dataclasses.field(compare=False)


class LlamaForCausalLM(nnx.Module):
    """Llama-family decoder-only language model (Llama, Mistral, Qwen2, Qwen3).

    Args:
        config: Architecture description, ``model_type`` in ``SUPPORTED_MODEL_TYPES``; treated as
            read-only after construction.
        dtype: Compute dtype of activations and matmuls.
        param_dtype: Storage dtype of the parameters.
        rngs: Random streams; ``rngs.params`` initialises the weights.
    """

    def __init__(
        self,
        config: transformers.LlamaConfig,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._config = _StaticConfig(config.to_json_string(use_diff=False), config)
        self.features = features_of(config)
        self.rope_theta = rope_theta(config)
        self.head_dim = head_dim_of(config)
        self.dtype = dtype
        self.remat = "none"  # decoder layers' rematerialisation policy (easytrain.models.remat.POLICIES)
        std = config.initializer_range
        self.embed_tokens = Embedding(
            config.vocab_size, config.hidden_size, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = nnx.List(
            DecoderLayer(config, features=self.features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        dense = _dense_factory(config, dtype, param_dtype, rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else dense(config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False)
        )

    @property
    def config(self) -> transformers.LlamaConfig:
        """The config the model was built from."""
        return self._config.config

    def __call__(
        self,
        input_ids_BT: Array,
        *,
        attention_mask_BT: Array | None = None,
        segment_ids_BT: Array | None = None,
        positions_BT: Array | None = None,
    ) -> Array:
        """Next-token logits.

        Args:
            input_ids_BT: Token ids.
            attention_mask_BT: 1 for real tokens, 0 for padding; padded keys are never attended.
            segment_ids_BT: Document ids of packed rows; tokens attend only within their segment.
            positions_BT: RoPE positions (restart them per packed segment); default ``arange(T)``.

        Returns:
            Float32 logits ``[B, T, V]``.
        """
        batch, length = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(length), (batch, length))
        cos_BTK, sin_BTK = rope_tables(positions_BT, self.head_dim, self.rope_theta, self.dtype)
        masks = {  # One mask per distinct window: full-attention layers share the causal one.
            window: attention_mask(batch, length, attention_mask_BT, segment_ids_BT, sliding_window=window)
            for window in dict.fromkeys(self.features.windows)
        }
        x_MD = constrain(self.embed_tokens(input_ids_BT).reshape(batch * length, -1), RESIDUAL_MD)
        run = layer_runner(self.remat)
        for layer, window in zip(self.layers, self.features.windows, strict=True):
            x_MD = constrain(run(layer, x_MD, cos_BTK, sin_BTK, masks[window]), RESIDUAL_MD)
        return self._logits(x_MD).reshape(batch, length, -1)

    def _logits(self, x_MD: Array) -> Array:
        """Final norm and output head, float32 logits ``[M, V]``."""
        x_MD = self.norm(x_MD)
        if self.lm_head is None:
            return constrain(self.embed_tokens.attend(x_MD), LOGITS_MV)
        return constrain(self.lm_head(x_MD, out_dtype=jnp.float32), LOGITS_MV)

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty key/value cache for ``decode``: ``max_length`` slots per row, prompt included."""
        attn = self.layers[0].self_attn
        return init_cache(len(self.layers), batch, max_length, attn.num_kv_heads, attn.head_dim, self.dtype)

    def decode(
        self,
        input_ids_BT: Array,
        cache: KVCache,
        *,
        attention_mask_BT: Array | None = None,
        logits_index_B: Array | None = None,
    ) -> tuple[Array, KVCache]:
        """Logits of tokens that continue the ones in ``cache``, and the cache holding them too.

        Prefill passes the whole padded prompt at once, then each step one token per row. Each real
        token's position continues its row's count, and attention is masked by position, so any
        padding (left, right, rows that stopped) is skipped and every row decodes as it would alone.

        Args:
            input_ids_BT: New tokens.
            cache: From ``init_cache`` or a previous ``decode``; ``cache.index + T`` must not exceed
                the ``max_length`` it was made with (an overflowing write is clamped and corrupts it).
            attention_mask_BT: 1 for real tokens, 0 for padding; default all real.
            logits_index_B: If given, only each row's logits at this index of ``T`` are computed,
                ``[B, 1, V]`` (prefill needs only the last prompt token's).

        Returns:
            Float32 logits ``[B, T, V]`` (or ``[B, 1, V]``) and the updated cache.
        """
        batch, length = input_ids_BT.shape
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((batch, length), jnp.int32)
        positions_BT, advanced = advance(cache, attention_mask_BT)
        cos_BTK, sin_BTK = rope_tables(positions_BT, self.head_dim, self.rope_theta, self.dtype)
        masks = {
            window: cached_attention_mask(positions_BT, advanced.positions_BS, sliding_window=window)
            for window in dict.fromkeys(self.features.windows)
        }
        x_MD = constrain(self.embed_tokens(input_ids_BT).reshape(batch * length, -1), RESIDUAL_MD)
        layer_caches = []
        for i, (layer, window) in enumerate(zip(self.layers, self.features.windows, strict=True)):
            x_MD, layer_cache = layer(x_MD, cos_BTK, sin_BTK, masks[window], cache.layer(i))
            x_MD = constrain(x_MD, RESIDUAL_MD)
            layer_caches.append(layer_cache)
        if logits_index_B is not None:
            x_MD, length = x_MD.reshape(batch, length, -1)[jnp.arange(batch), logits_index_B], 1
        return self._logits(x_MD).reshape(batch, length, -1), with_layers(advanced, layer_caches)


def init_model(
    config: transformers.LlamaConfig,
    *,
    seed: int = 0,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
) -> LlamaForCausalLM:
    """Randomly initialised model, built outside any mesh.

    Parameters carry logical-axis annotations; eager sharding is switched off
    so that construction does not require a mesh.

    Args:
        config: Architecture description.
        seed: Seed of the ``params`` random stream.
        dtype: Compute dtype.
        param_dtype: Parameter storage dtype.

    Returns:
        The model, parameters on the default device.
    """
    with nnx.use_eager_sharding(False):
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
