"""Splash attention (jax's Pallas TPU flash-attention kernel) for training: the mask as structure.

Causality and a sliding window are the kernel's static block-sparse mask, so masked blocks are skipped
and no ``[T, S]`` array is formed; packed segments and padding are its ``SegmentIds``: a token's segment
is its document id, and padding tokens (and the tokens added to reach a multiple of the block size) get
`PADDING_SEGMENT`, which no real token has, so real queries never see them. Queries at padding positions
see only padding keys, so their outputs differ from the ``"xla"`` path's uniform average; every real
position is equal, values and gradients (``tests/test_splash_attention.py``).

On TPU the kernel is compiled by Mosaic; on CPU it runs in Pallas's interpreter, which is slow and
exists to check the TPU path where tests run; GPUs are refused (use ``dot_product_attention``, cuDNN).
Under a device mesh the kernel runs on each device's shard (`sharding.per_device`): batch over the
data-parallel axes, key/value heads over ``tensor``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from easytrain.errors import ArgumentError
from easytrain.sharding import per_device

Array = jax.Array

#: Segment id of padding: below any document id a packed batch carries (those count from 0).
PADDING_SEGMENT = int(jnp.iinfo(jnp.int32).min)
#: Block edge of the kernel's tiles (queries and keys, forward and backward): TPU tiles are multiples of 128,
#: and 512 is the edge MaxText's splash configuration uses; shorter sequences take one 128-multiple block.
BLOCK = 512


def check_backend(backend: str) -> None:
    """Splash is a TPU kernel: refuse GPUs, where it would run interpreted, before anything is compiled."""
    if backend == "gpu":
        raise ArgumentError("attention_implementation", "'splash' is jax's TPU kernel; on a GPU use "
                            "'dot_product_attention' (cuDNN flash attention in bfloat16/float16).")


def block_size(length: int) -> int:
    """The tile edge for a sequence of `length` tokens: `BLOCK`, or one 128-multiple block when shorter."""
    return min(BLOCK, -(-length // 128) * 128)


@functools.lru_cache(maxsize=32)
def splash_kernel(length: int, group: int, window: int | None, block: int, interpret: bool):
    """The kernel for one key/value head and its `group` query heads (MQA form) over `length` tokens.

    Building it computes the block-sparsity tables of the mask in NumPy, so kernels are cached by shape, and
    their tables are concrete arrays (built outside any trace), which a later trace may close over.
    """
    shape = (length, length)
    one = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), offset=0)
    sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return kernels.make_splash_mqa(masks.MultiHeadMask([one] * group), block_sizes=sizes, head_shards=1,
                                       q_seq_shards=1, interpret=interpret)


def splash_segments(batch: int, length: int, attention_mask_BT: Array | None, segment_ids_BT: Array | None
                    ) -> Array:
    """Segment ids ``[B, T]`` the kernel compares: documents (one per row unpacked), padding apart."""
    segments_BT = (jnp.zeros((batch, length), jnp.int32) if segment_ids_BT is None
                   else segment_ids_BT.astype(jnp.int32))
    if attention_mask_BT is not None:
        segments_BT = jnp.where(attention_mask_BT != 0, segments_BT, PADDING_SEGMENT)
    return segments_BT


def attend_splash(q_BTNGK: Array, k_BTNK: Array, v_BTNK: Array, segments_BT: Array, window: int | None) -> Array:
    """``grouped_attention`` of causal self-attention (within `window`) among tokens of equal segment id."""
    check_backend(jax.default_backend())
    batch, length, kv_heads, group, head_dim = q_BTNGK.shape
    block = block_size(length)
    padded = -(-length // block) * block
    extra = padded - length
    pad = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q_BNGTK = jnp.transpose(pad(q_BTNGK * jnp.asarray(head_dim**-0.5, q_BTNGK.dtype)), (0, 2, 3, 1, 4))
    k_BNTK, v_BNTK = (jnp.transpose(pad(x), (0, 2, 1, 3)) for x in (k_BTNK, v_BTNK))
    segments_BT = jnp.pad(segments_BT, [(0, 0), (0, extra)], constant_values=PADDING_SEGMENT)
    kernel = splash_kernel(padded, group, window, block, jax.default_backend() != "tpu")

    def local(q_BNGTK: Array, k_BNTK: Array, v_BNTK: Array, segments_BT: Array) -> Array:
        def one_head(q_GTK: Array, k_TK: Array, v_TK: Array, segments_T: Array) -> Array:
            return kernel(q_GTK, k_TK, v_TK, segment_ids=kernels.SegmentIds(q=segments_T, kv=segments_T))

        over_heads = jax.vmap(one_head, in_axes=(0, 0, 0, None))
        return jax.vmap(over_heads)(q_BNGTK, k_BNTK, v_BNTK, segments_BT)

    out_BNGTK = per_device(local, (q_BNGTK, k_BNTK, v_BNTK, segments_BT),
                           (("batch", "heads"), ("batch", "heads"), ("batch", "heads"), ("batch",)))
    return jnp.transpose(out_BNGTK, (0, 3, 1, 2, 4))[:, :length]
