"""Attention masks as structure, and the attention implementations that read it.

`AttentionMask` says which keys each query sees (causal within an optional sliding window, real
keys, same packed segment) without building the boolean ``[B, T, S]`` mask. The ``"xla"``
implementation builds that mask from it (`AttentionMask.dense`, the same mask as always) and runs
`causal_grouped_attention` (sequences of `BLOCKED_FROM` tokens or more in `QUERY_BLOCKS` query blocks, each
scored only against the keys up to its end); ``"dot_product_attention"`` hands the structure to
`jax.nn.dot_product_attention` as ``is_causal``, ``local_window_size`` and key lengths; ``"splash"`` to
jax's Pallas TPU flash-attention kernel as its block-sparse mask and segment ids (`easytrain.models.splash`:
packing and padding as structure too).

What each backend receives on the ``"dot_product_attention"`` path (`attend_structured`):

- causal, window: static arguments. cuDNN (NVIDIA GPU, bfloat16/float16 inputs) skips the masked
  blocks; jax's XLA implementation (every other case) builds a ``[T, S]`` boolean from them.
- padding (``attention_mask_BT``): XLA: a boolean ``[B, 1, 1, S]`` key mask, always (jax builds the
  same boolean from key lengths, so they would buy nothing). cuDNN: when every row is real tokens then
  padding (checked on device, one ``lax.cond`` per layer, both branches compiled), the key lengths
  ``[B]`` (its padding mask type, no mask array); otherwise (left or inner padding) a boolean
  ``[B, 1, T, S]`` mask, which it converts to an additive bias of that shape (`passes_key_lengths`).
- packing (``segment_ids_BT``): a boolean ``[B, 1, T, S]`` mask (same segment, key real), built
  always, because ``jax.nn.dot_product_attention`` has no segment argument (cuDNN's packed layout,
  ``q_offsets``/``kv_offsets``, is reachable only through jax's private cuDNN module). On cuDNN it
  becomes an additive bias ``[B, 1, T, S]`` in the compute dtype.

Outputs equal the ``"xla"`` path at every position, padding included (a query with no visible key
gets the same uniform average either way).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from easytrain.models.attention import DType, attention_mask, causal_grouped_attention
from easytrain.models.splash import attend_splash, splash_segments

Array = jax.Array

#: Values of ``LlamaForCausalLM.attention_implementation`` (and of the training argument).
IMPLEMENTATIONS = ("xla", "dot_product_attention", "splash")
#: The "xla" path's query blocks (`causal_grouped_attention`) for sequences of at least `BLOCKED_FROM` tokens:
#: 2 blocks skip a quarter of the scores for one more attention per layer to compile. Measured at 256 tokens
#: (the benchmark Llama, XLA:CPU): the train step 1.05x faster, compile 1.2x longer; 4 blocks no faster and
#: compile 2x longer. Shorter sequences have less attention to skip, so they keep one block.
QUERY_BLOCKS, BLOCKED_FROM = 2, 256


@partial(jax.tree_util.register_dataclass, data_fields=("attention_mask_BT", "segment_ids_BT"),
         meta_fields=("window", "kernel"))
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Causal attention within ``window`` (None: unbounded), over real keys of the same segment.

    Causality and the window count sequence indices (see `causal_mask`); ``attention_mask_BT`` is
    1 for real tokens, 0 for padding; ``segment_ids_BT`` are packed documents' ids. ``kernel`` is the
    implementation that reads the structure: ``"dot_product_attention"`` or ``"splash"``.
    """

    attention_mask_BT: Array | None = None
    segment_ids_BT: Array | None = None
    window: int | None = None
    kernel: str = "dot_product_attention"

    def dense(self, batch: int, length: int) -> Array:
        """The boolean ``[B, T, S]`` mask the structure describes."""
        return attention_mask(batch, length, self.attention_mask_BT, self.segment_ids_BT, self.window)


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(IMPLEMENTATIONS)}, "
                         f"got {implementation!r}")


def attend(q_BTNGK: Array, k_BSNK: Array, v_BSNK: Array, mask: Array | AttentionMask) -> Array:
    """Self-attention under a dense ``[B, T, S]`` mask ("xla") or a structured one ("dot_product_attention",
    "splash": `easytrain.models.splash`).

    A dense mask must be causal in sequence order, as `AttentionMask.dense` builds it: its query blocks see
    no later key (`causal_grouped_attention`).
    """
    if isinstance(mask, AttentionMask) and mask.kernel == "splash":
        segments_BT = splash_segments(*q_BTNGK.shape[:2], mask.attention_mask_BT, mask.segment_ids_BT)
        return attend_splash(q_BTNGK, k_BSNK, v_BSNK, segments_BT, mask.window)
    if isinstance(mask, AttentionMask):
        return attend_structured(q_BTNGK, k_BSNK, v_BSNK, mask)
    blocks = QUERY_BLOCKS if q_BTNGK.shape[1] >= BLOCKED_FROM else 1
    return causal_grouped_attention(q_BTNGK, k_BSNK, v_BSNK, mask, query_blocks=blocks)


def kernel_for(dtype: DType) -> Literal["cudnn"] | None:
    """cuDNN flash attention on CUDA GPUs for 16-bit inputs (it takes no others), else jax's XLA one.

    ``jax.nn.dot_product_attention``'s own default (``implementation=None``) is XLA on every
    backend in this jax version, so cuDNN has to be asked for.
    """
    cuda = jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
    return "cudnn" if cuda and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else None


def trailing_lengths(attention_mask_BT: Array) -> tuple[Array, Array]:
    """Real tokens per row (int32 ``[B]``), and whether every row is its real tokens then padding."""
    real_BT = attention_mask_BT != 0
    lengths_B = jnp.sum(real_BT, axis=1, dtype=jnp.int32)
    prefix_BT = jnp.arange(real_BT.shape[1])[None, :] < lengths_B[:, None]
    return lengths_B, jnp.all(real_BT == prefix_BT)


def passes_key_lengths(kernel: str | None) -> bool:
    """Whether trailing padding goes in as key lengths: for cuDNN only, whose padding mask type needs no mask
    array. jax's XLA implementation builds the same key-mask boolean from lengths as from a mask, so there they
    would buy nothing and cost a `lax.cond` per layer (both branches compiled; on XLA:GPU a conditional copies
    its predicate to the host and blocks on it)."""
    return kernel == "cudnn"


def attend_structured(q_BTNGK: Array, k_BSNK: Array, v_BSNK: Array, mask: AttentionMask) -> Array:
    """`grouped_attention` through ``jax.nn.dot_product_attention``; what each case passes: module doc."""
    batch, length, kv_heads, group, head_dim = q_BTNGK.shape
    kernel = kernel_for(q_BTNGK.dtype)
    window = None if mask.window is None else (mask.window - 1, 0)  # the query and window - 1 before it
    call = partial(jax.nn.dot_product_attention, q_BTNGK.reshape(batch, length, kv_heads * group, head_dim),
                   k_BSNK, v_BSNK, is_causal=True, local_window_size=window, implementation=kernel)
    real_BS = None if mask.attention_mask_BT is None else mask.attention_mask_BT != 0
    if mask.segment_ids_BT is not None:
        segments_BT = mask.segment_ids_BT
        keep_B1TS = (segments_BT[:, :, None] == segments_BT[:, None, :])[:, None]
        out_BTHK = call(mask=keep_B1TS if real_BS is None else keep_B1TS & real_BS[:, None, None, :])
    elif real_BS is not None and passes_key_lengths(kernel):
        lengths_B, trailing = trailing_lengths(real_BS)
        keep_B11S = real_BS[:, None, None, :]
        if kernel == "cudnn":  # cuDNN takes a mask only as a [.., T, S] bias
            keep_B11S = jnp.broadcast_to(keep_B11S, (batch, 1, length, real_BS.shape[1]))
        out_BTHK = jax.lax.cond(trailing, lambda: call(key_value_seq_lengths=lengths_B),
                                lambda: call(mask=keep_B11S))
    elif real_BS is not None:
        out_BTHK = call(mask=real_BS[:, None, None, :])
    else:
        out_BTHK = call()
    return out_BTHK.reshape(q_BTNGK.shape)
