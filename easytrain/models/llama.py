"""Llama-family causal language model in Flax NNX.

One code path for Llama, Mistral, Qwen2 and Qwen3: ``features_of(config)`` turns the
config's family into a few switches (biases, q/k norm, per-layer sliding windows).
Built from a ``transformers`` config with the Hugging Face parameter layout
(rotate-half RoPE, flattened ``[D, heads * head_dim]`` projections), so Hugging
Face checkpoints load with plain transposes and no permutation.

Shape suffixes: B batch, T query length, S key length, M = B*T flattened tokens,
D hidden size, F MLP size, V vocabulary, H query heads, N key/value heads,
G = H/N query heads per key/value head, K head dimension.

The layers live in ``easytrain.models.layers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from easytrain.models.attention import DType, cached_attention_mask, rope_tables
from easytrain.models.families import ConfigError, features_of, head_dim_of, rope_scaling, rope_theta
from easytrain.models.kv_cache import KVCache, advance, init_cache, with_layers
from easytrain.models.layers import LOGITS_MV, RESIDUAL_MD, DecoderLayer, Embedding, RMSNorm, dense_factory
from easytrain.models.masks import AttentionMask, check_implementation
from easytrain.models.remat import layer_runner
from easytrain.models.scan import StackedLayers, build_layers
from easytrain.models.token_ids import TOKEN_ID_FIELDS, attribute_fix, token_id_refusal
from easytrain.sharding import constrain

Array = jax.Array

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
        scan_layers: Build the decoder layers stacked (``scan_layers`` below) rather than as a list and then
            restacked: the weights are the same, but their initialisation is traced and compiled once whatever
            the depth.
    """

    def __init__(
        self,
        config: transformers.LlamaConfig,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
        scan_layers: bool = False,
    ):
        self._config = _StaticConfig(config.to_json_string(use_diff=False), config)
        self.features = features_of(config)
        self.rope_theta = rope_theta(config)
        self.rope_scaling = rope_scaling(config)  # None, or a long-context checkpoint's scaled frequencies
        self.head_dim = head_dim_of(config)
        self.dtype = dtype
        self.remat = "none"  # decoder layers' rematerialisation policy (easytrain.models.remat.POLICIES)
        self.attention_implementation = "xla"  # or "dot_product_attention", "splash" (models.masks); not decode's
        std = config.initializer_range
        self.embed_tokens = Embedding(
            config.vocab_size, config.hidden_size, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

        def make_layer(layer_rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, features=self.features, dtype=dtype, param_dtype=param_dtype, rngs=layer_rngs)

        # Each layer draws from its own streams: the same weights built one by one or stacked in one vmap.
        self.layers = build_layers(make_layer, config.num_hidden_layers, rngs, stacked=scan_layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        dense = dense_factory(config, dtype, param_dtype, rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else dense(config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False)
        )

    @property
    def config(self) -> transformers.LlamaConfig:
        """The config the model was built from."""
        return self._config.config

    @property
    def scan_layers(self) -> bool:
        """Whether the decoder layers are stored stacked and run as one ``lax.scan`` in ``__call__``
        (``easytrain.models.scan``). Setting it restacks or unstacks ``layers`` one weight at a time: the devices hold
        at most one stacked weight more than the model, and a layer module taken from ``layers`` before is left
        without its variables."""
        return isinstance(self.layers, StackedLayers)

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "scan_layers":
            return super().__setattr__(name, value)
        if bool(value) != self.scan_layers:
            layers = self.layers  # moved a variable at a time, each taken out once moved: no second copy of all
            self.layers = StackedLayers(layers, consume=True) if value else nnx.List(layers.unstack(consume=True))

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
        x_MD = self.hidden_states(input_ids_BT, attention_mask_BT=attention_mask_BT, segment_ids_BT=segment_ids_BT,
                                  positions_BT=positions_BT)
        return self.logits_from_hidden(x_MD).reshape(batch, length, -1)

    def hidden_states(
        self,
        input_ids_BT: Array,
        *,
        attention_mask_BT: Array | None = None,
        segment_ids_BT: Array | None = None,
        positions_BT: Array | None = None,
    ) -> Array:
        """Final normed hidden states ``[B*T, D]`` (batch-major), what ``logits_from_hidden`` projects:
        a loss can apply the head a few tokens at a time (``easytrain.chunked_loss``). Arguments as ``__call__``."""
        batch, length = input_ids_BT.shape
        if positions_BT is None:  # every row at positions 0..T-1: one row of tables, broadcast over the batch
            positions_BT = jnp.arange(length)[None, :]
        cos_BTK, sin_BTK = rope_tables(positions_BT, self.head_dim, self.rope_theta, self.dtype, self.rope_scaling)
        check_implementation(self.attention_implementation)
        masks = {  # One mask per distinct window: full-attention layers share the causal one.
            window: AttentionMask(attention_mask_BT, segment_ids_BT, window, self.attention_implementation)
            for window in dict.fromkeys(self.features.windows)
        }
        if self.attention_implementation == "xla":
            masks = {window: mask.dense(batch, length) for window, mask in masks.items()}
        x_MD = constrain(self.embed_tokens(input_ids_BT).reshape(batch * length, -1), RESIDUAL_MD)
        if self.scan_layers:
            x_MD = self._scanned_layers(x_MD, cos_BTK, sin_BTK, masks)
        else:
            run = layer_runner(self.remat)
            for layer, window in zip(self.layers, self.features.windows, strict=True):
                x_MD = constrain(run(layer, x_MD, cos_BTK, sin_BTK, masks[window]), RESIDUAL_MD)
        return self.norm(x_MD)

    def _scanned_masks(self, masks: dict[int | None, Array | AttentionMask]
                       ) -> tuple[Callable[[Array], Array | AttentionMask], Array]:
        """Each layer's mask in a scan over the layers: a function of a scanned index, and each layer's index.
        With mixed windows a layer picks its dense mask from the distinct ones (``[W, B, T, S]`` for W distinct
        windows, rather than one mask per layer)."""
        windows = list(masks)
        if len(windows) > 1 and isinstance(masks[windows[0]], AttentionMask):
            raise ValueError(  # a structured mask's window is static: it cannot vary along the scan
                f"scan_layers with attention_implementation {self.attention_implementation!r} needs one attention "
                f"window for every layer; this config mixes {windows} (None: full attention). Set "
                "model.attention_implementation = 'xla' (dense masks take a window per layer) or "
                "model.scan_layers = False (in a trainer: --attention_implementation xla or --scan_layers false).")
        masks_WBTS = jnp.stack([masks[window] for window in windows]) if len(windows) > 1 else None
        window_index_L = jnp.asarray([windows.index(window) for window in self.features.windows])
        return (lambda index: masks[windows[0]] if masks_WBTS is None else masks_WBTS[index]), window_index_L

    def _scanned_layers(self, x_MD: Array, cos_BTK: Array, sin_BTK: Array,
                        masks: dict[int | None, Array | AttentionMask]) -> Array:
        """The decoder layers as one scan."""
        mask_of, window_index_L = self._scanned_masks(masks)

        def step(layer: DecoderLayer, x_MD: Array, window_index: Array) -> Array:
            return constrain(layer(x_MD, cos_BTK, sin_BTK, mask_of(window_index)), RESIDUAL_MD)

        return self.layers.scan(x_MD, step, window_index_L, policy=self.remat)

    def _scanned_decode(self, x_MD: Array, cos_BTK: Array, sin_BTK: Array, masks: dict[int | None, Array],
                        cache: KVCache) -> tuple[Array, Array, Array]:
        """Decoding through the stacked layers as one scan: no per-layer copy of the weights is made, and the
        stacked cache rides in the carry, each layer writing its new keys and values into it in place."""
        mask_of, window_index_L = self._scanned_masks(masks)

        def step(layer: DecoderLayer, carry: tuple[Array, Array, Array], xs: tuple[Array, Array]):
            x_MD, keys, values = carry
            window_index, index = xs
            x_MD, written = layer(x_MD, cos_BTK, sin_BTK, mask_of(window_index),
                                  cache._replace(keys=keys, values=values).layer(index))
            return constrain(x_MD, RESIDUAL_MD), written.keys, written.values

        layer_index_L = jnp.arange(len(self.layers), dtype=jnp.int32)
        return self.layers.scan((x_MD, cache.keys, cache.values), step, (window_index_L, layer_index_L))

    def logits_from_hidden(self, x_MD: Array) -> Array:
        """The output head (tied embedding or ``lm_head``, LoRA-adapted or not): float32 logits ``[M, V]``
        of final normed hidden states ``[M, D]``, any number of tokens."""
        if self.lm_head is None:
            return constrain(self.embed_tokens.attend(x_MD), LOGITS_MV)
        return constrain(self.lm_head(x_MD, out_dtype=jnp.float32), LOGITS_MV)

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty key/value cache for ``decode``: ``max_length`` slots per row, prompt included."""
        attn = (self.layers.stacked if self.scan_layers else self.layers[0]).self_attn
        return init_cache(len(self.layers), batch, max_length, attn.num_kv_heads, attn.head_dim, self.dtype,
                          stacked=self.scan_layers)

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
        cos_BTK, sin_BTK = rope_tables(positions_BT, self.head_dim, self.rope_theta, self.dtype, self.rope_scaling)
        masks = {
            window: cached_attention_mask(positions_BT, advanced.positions_BS, sliding_window=window)
            for window in dict.fromkeys(self.features.windows)
        }
        x_MD = constrain(self.embed_tokens(input_ids_BT).reshape(batch * length, -1), RESIDUAL_MD)
        if cache.stacked != self.scan_layers:
            raise ValueError(f"decode: this cache was made for scan_layers={cache.stacked} but the model has "
                             f"scan_layers={self.scan_layers}; make the cache with this model's init_cache().")
        if self.scan_layers:
            x_MD, keys, values = self._scanned_decode(x_MD, cos_BTK, sin_BTK, masks, cache)
            advanced = advanced._replace(keys=keys, values=values)
        else:
            layer_caches = []
            for i, (layer, window) in enumerate(zip(self.layers, self.features.windows, strict=True)):
                x_MD, layer_cache = layer(x_MD, cos_BTK, sin_BTK, masks[window], cache.layer(i))
                x_MD = constrain(x_MD, RESIDUAL_MD)
                layer_caches.append(layer_cache)
            advanced = with_layers(advanced, layer_caches)
        if logits_index_B is not None:
            x_MD, length = x_MD.reshape(batch, length, -1)[jnp.arange(batch), logits_index_B], 1
        logits_MV = self.logits_from_hidden(self.norm(x_MD))
        return logits_MV.reshape(batch, length, -1), advanced


def check_config_token_ids(config: transformers.PretrainedConfig, source: str = "the config",
                           fix: str | None = None) -> None:
    """`token_ids.token_id_refusal` of the config's own fields, as a `ConfigError` naming the attribute to set (or
    `fix`, where the config was read from a file: "{field}" is replaced by the field)."""
    fields = {field: getattr(config, field, None) for field in TOKEN_ID_FIELDS}
    fix = fix or attribute_fix("config", ": an export writes it to generation_config.json, which from_pretrained "
                                         "refuses")
    if refusal := token_id_refusal(source, fields, getattr(config, "vocab_size", None), fix):
        raise ConfigError(refusal)


def init_model(
    config: transformers.LlamaConfig,
    *,
    seed: int = 0,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    scan_layers: bool = False,
) -> LlamaForCausalLM:
    """Randomly initialised model, built outside any mesh.

    Parameters carry logical-axis annotations; eager sharding is switched off
    so that construction does not require a mesh.

    Args:
        config: Architecture description.
        seed: Seed of the ``params`` random stream.
        dtype: Compute dtype.
        param_dtype: Parameter storage dtype.
        scan_layers: Build the decoder layers stacked (the same weights).

    Returns:
        The model, parameters on the default device.

    Raises:
        ConfigError: A token id field of the config holds no id of the model (`easytrain.models.token_ids`):
            an export would write it to ``generation_config.json``, which ``from_pretrained`` refuses.
    """
    check_config_token_ids(config)
    with nnx.use_eager_sharding(False):
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed),
                                scan_layers=scan_layers)
