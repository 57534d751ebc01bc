"""Cross-entropy and target log-probabilities from final hidden states, a few tokens at a time.

A 128k vocabulary makes the float32 logits `[M, V]` of a batch the largest tensor of a training step
(4096 tokens x 131072 x 4 bytes = 2 GiB, twice over in the backward pass). Here the output head runs
on `C` tokens at a time inside `lax.map`, each chunk under `jax.checkpoint`: the forward keeps only
per-token results, and the backward recomputes one chunk's `[C, V]` logits at a time. Values and
gradients are those of the full logits: both paths share the per-token math (`token_scores`,
`target_logps`); only float32 summation order differs.

Chunks interleave tokens (chunk `j` holds tokens `j, j + n, j + 2n, ...`): a token axis split across
devices by batch then splits every chunk evenly too, so each device works on every step of the loop.

Shape suffixes: M tokens (batch x time, flattened), D hidden size, V vocabulary, C tokens per chunk,
N chunks.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from easytrain.models.maxima import shift_max

Array = jax.Array
#: `x_CD -> logits_CV`, float32: the output head applied to a few tokens' final hidden states.
Head = Callable[[Array], Array]
#: `(logits_CV, targets_C) -> pytree of [C] arrays`: what to keep of each token's logits.
PerToken = Callable[[Array, Array], Any]


def chunking_problem(module: Any) -> str | None:
    """Why `module` cannot have its loss computed a few tokens at a time, or None."""
    missing = [name for name in ("hidden_states", "logits_from_hidden") if not callable(getattr(module, name, None))]
    if missing:
        return (f"{type(module).__name__} has no {' or '.join(missing)} method: a chunked loss needs the final hidden "
                "states and the head separately (see LlamaForCausalLM); set loss_chunk_size 0.")
    if getattr(getattr(module, "lm_head", None), "lora_dropout", None) is not None:
        return ("lm_head has LoRA dropout, which draws its random mask once per call and cannot run once per "
                "chunk; drop lm_head from lora_target_modules, set lora_dropout 0, or set loss_chunk_size 0.")
    return None


def dense_head(weight_DV: Array) -> Head:
    """The head `x @ weight` of an untied output projection `[D, V]`, float32 accumulation."""
    return lambda x_CD: jnp.dot(x_CD.astype(weight_DV.dtype), weight_DV, preferred_element_type=jnp.float32)


def tied_head(table_VD: Array) -> Head:
    """The head `x @ table.T` of an embedding table `[V, D]` tied to the output, float32 accumulation."""
    return lambda x_CD: jnp.dot(x_CD.astype(table_VD.dtype), table_VD.T, preferred_element_type=jnp.float32)


def token_scores(logits_MV: Array, targets_M: Array) -> tuple[Array, Array]:
    """Per-token float32 cross-entropy `logsumexp(logits) - logits[target]` and argmax hit (1.0 or 0.0).

    One max reduction serves both: `first_max` is the shift of the log-sum-exp (within a float of the row's
    largest logit, as stable as the exact maximum) and tells whether the target is the argmax.
    """
    logits_MV = logits_MV.astype(jnp.float32)
    target_M = jnp.take_along_axis(logits_MV, targets_M[..., None], axis=-1)[..., 0]
    top_M = first_max(logits_MV, targets_M)
    shift_M = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top_M), top_M, 0.0))
    # The target's logit relative to the shift, not both absolute: no rounding of the large sum `shift + log`.
    nll_M = jnp.log(jnp.sum(jnp.exp(logits_MV - shift_M[..., None]), axis=-1)) - (target_M - shift_M)
    return nll_M, (top_M == target_M).astype(jnp.float32)


def first_max(logits_MV: Array, targets_M: Array) -> Array:
    """The largest logit of each row after every logit before the target is raised to the next float; it
    equals the target's logit exactly when the target is `jnp.argmax` (ties going to the first index).

    An earlier logit equal to the largest then exceeds the target's, a smaller one at most reaches it, and a
    later one is compared as it is. Zero and subnormal logits are raised to the smallest normal float instead,
    since XLA:CPU flushes subnormals to zero (so those logits count as zero, as the hardware compares them).
    A separate maximum over the earlier logits cost a second pass over `[M, V]` (XLA:CPU does not fuse
    sibling reductions); `jnp.argmax`'s index-carrying reduction runs at a third of a plain one's speed.
    """
    logits_MV = jax.lax.stop_gradient(logits_MV)
    tiny = jnp.finfo(logits_MV.dtype).tiny
    raised_MV = jnp.where(jnp.abs(logits_MV) < tiny, tiny, jnp.nextafter(logits_MV, jnp.inf))
    earlier_MV = jnp.arange(logits_MV.shape[-1]) < targets_M[..., None]
    return shift_max(jnp.where(earlier_MV, raised_MV, logits_MV), axis=-1)


def masked_token_sums(nll_M: Array, correct_M: Array, mask_M: Array) -> tuple[Array, Array, Array]:
    """(cross-entropy sum, supervised-token count, correct-argmax count) over the tokens the mask weighs.

    A masked token adds exactly nothing, selected away rather than multiplied by 0: a collate may mark ignored
    targets with an id outside the vocabulary (Hugging Face's -100), whose gathered logit is NaN, and NaN * 0 is NaN.
    """
    mask_M = mask_M.astype(jnp.float32)
    kept = mask_M != 0
    return (jnp.sum(jnp.where(kept, nll_M * mask_M, 0.0)), jnp.sum(mask_M),
            jnp.sum(jnp.where(kept, correct_M * mask_M, 0.0)))


def target_logps(logits_MV: Array, targets_M: Array) -> Array:
    """`log_softmax(logits)[target]` per token, in float32: minus `token_scores`' cross-entropy."""
    return -token_scores(logits_MV, targets_M)[0]


def map_token_chunks(per_token: PerToken, head: Head, x_MD: Array, targets_M: Array, chunk_size: int) -> Any:
    """`per_token(head(x_MD), targets_M)`, computed `chunk_size` tokens at a time.

    Args:
        per_token: reduces each token's logits to a few numbers (a pytree of `[C]` arrays).
        head: the output projection; may close over a module (a LoRA-adapted head is called, not read).
        x_MD: final (normed) hidden states.
        targets_M: integer labels, one per token.
        chunk_size: tokens per chunk `C`; any positive size (M is padded up to a multiple of it).

    Returns:
        `per_token`'s pytree with `[M]` leaves.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    tokens = x_MD.shape[0]
    size = min(chunk_size, tokens)
    chunks = -(-tokens // size)
    padded = chunks * size - tokens  # padding rows: zero hidden states and label 0, sliced off below
    x_MD = jnp.pad(x_MD, ((0, padded), (0, 0)))
    targets_M = jnp.pad(targets_M, (0, padded))
    x_NCD = x_MD.reshape(size, chunks, -1).swapaxes(0, 1)  # chunk j: tokens j, j + N, j + 2N, ...
    targets_NC = targets_M.reshape(size, chunks).swapaxes(0, 1)

    @jax.checkpoint  # the backward recomputes this chunk's logits instead of saving them
    def body(operands: tuple[Array, Array]) -> Any:
        x_CD, targets_C = operands
        return per_token(head(x_CD), targets_C)

    out_NC = jax.lax.map(body, (x_NCD, targets_NC))
    return jax.tree.map(lambda y_NC: y_NC.swapaxes(0, 1).reshape(-1)[:tokens], out_NC)


def chunked_token_scores(head: Head, x_MD: Array, targets_M: Array, chunk_size: int) -> tuple[Array, Array]:
    """`token_scores` of `head(x_MD)`, chunk by chunk: `[M]` cross-entropies and argmax hits."""
    return map_token_chunks(token_scores, head, x_MD, targets_M, chunk_size)


def chunked_cross_entropy_sums(head: Head, x_MD: Array, targets_M: Array, mask_M: Array,
                               chunk_size: int) -> tuple[Array, Array, Array]:
    """`easytrain.losses.token_cross_entropy_sums` of `head(x_MD)`, never holding more than `[C, V]` logits.

    Returns:
        The masked cross-entropy sum, the supervised-token count and the correct-argmax count (float32).
    """
    return masked_token_sums(*chunked_token_scores(head, x_MD, targets_M, chunk_size), mask_M)


def chunked_target_logps(head: Head, x_MD: Array, targets_M: Array, chunk_size: int) -> Array:
    """Float32 `log_softmax(head(x_MD))[target]` per token, `[M]`, chunk by chunk (sequence log-probs of
    DPO/SFT sum these over completion tokens, `easytrain.sequence_logps.sequence_logps`)."""
    return map_token_chunks(target_logps, head, x_MD, targets_M, chunk_size)
