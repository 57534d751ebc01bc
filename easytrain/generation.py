"""Batched text generation with a key/value cache, compiled once per shape.

The prompt is read in one prefill pass, then one token per row per step inside a ``lax.while_loop``
that stops as soon as every row has emitted EOS. Everything has static shapes, so a call compiles
once per (batch, prompt length, ``GenerationConfig``); pad prompts to a few length buckets
(``pad_prompts(..., multiple=...)``) to reuse compilations.

Padding: prompts may be left- or right-padded, even mixed, with ``attention_mask`` marking real
tokens. Positions count real tokens only and padding is never attended, so each row's output equals
generating that prompt alone (up to float rounding in batched matmuls).

Example::

    ids, mask = pad_prompts([[1, 5, 9], [1, 7]], pad_id=0)
    new_tokens = generate(model, ids, mask, max_new_tokens=16, eos_token_id=2, pad_token_id=0)

Inside a compiled program (a rollout in a train step), ``generate_traced`` decodes the same way from traced
arrays and a PRNG key, and returns the tokens with a mask of the generated ones.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import reprlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from easytrain.errors import EasytrainError
from easytrain.sampling import filter_logits, sample_logits

__all__ = ["GenerationConfig", "GenerationError", "Generated", "filter_logits", "generate", "generate_traced",
           "greedy_complete", "pad_prompts", "sample_logits"]

if TYPE_CHECKING:
    import transformers

Array = jax.Array
T = TypeVar("T")


class GenerationError(EasytrainError, ValueError):
    """Generation settings or inputs that cannot work."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; hashable, since they are static for the compiled loop.

    Attributes:
        max_new_tokens: Tokens generated per row (the output width).
        do_sample: Sample from the filtered distribution; False picks the argmax (greedy).
        temperature: Logits are divided by it before filtering (sampling only).
        top_k: Keep only the k highest logits (ties with the k-th kept too).
        top_p: Keep the smallest set of most likely tokens whose probability reaches top_p.
        eos_token_id: Ids that end a row; the EOS itself is emitted, pad after it.
        pad_token_id: Emitted by rows that have finished.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        self._check_types()
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens = {self.max_new_tokens}; ask for at least 1 token.")
        if not self.temperature > 0:
            raise GenerationError(f"temperature = {self.temperature} must be > 0; use do_sample=False for greedy.")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k = {self.top_k} must be >= 1, or None to keep every token.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p = {self.top_p} must be in (0, 1], or None to keep every token.")
        if not self.do_sample and (self.top_k is not None or self.top_p is not None or self.temperature != 1.0):
            raise GenerationError("temperature, top_k and top_p only apply when sampling; set do_sample=True.")

    def _check_types(self) -> None:
        """Sizes and ids must be integers (not bool) before any comparison: a float would reach the compiled
        loop as a shape and fail there with a raw JAX TypeError. Numpy integers become ints (hashing)."""
        eos = (self.eos_token_id,) if _is_int(self.eos_token_id) else tuple(self.eos_token_id)
        if not all(_is_int(token) for token in eos):
            raise GenerationError(f"eos_token_id = {self.eos_token_id!r} must hold int token ids.")
        object.__setattr__(self, "eos_token_id", tuple(int(token) for token in eos))
        if not isinstance(self.do_sample, (bool, np.bool_)):  # "False" would sample, None decode greedily
            raise GenerationError(f"do_sample = {self.do_sample!r} must be a bool (True samples, False is greedy).")
        object.__setattr__(self, "do_sample", bool(self.do_sample))
        for name, kind, check in (("max_new_tokens", "an int", _is_int), ("top_k", "an int or None", _is_int),
                                  ("pad_token_id", "an int", _is_int), ("temperature", "a number", _is_real),
                                  ("top_p", "a number or None", _is_real)):
            value = getattr(self, name)
            if value is None and kind.endswith("None"):
                continue
            if not check(value):
                raise GenerationError(f"{name} = {value!r} must be {kind}.")
            if check is _is_int:
                object.__setattr__(self, name, int(value))
        if self.pad_token_id < 0:  # emitted after EOS: a negative id fails every decode of the output
            raise GenerationError(f"pad_token_id = {self.pad_token_id} must be a token id >= 0 (finished rows emit "
                                  "it); pass the tokenizer's pad id, or leave it unset for the first EOS id.")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _next_token(logits_BV: Array, rng: Array, config: GenerationConfig) -> Array:
    if not config.do_sample:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return sample_logits(logits_BV, rng, config.temperature, config.top_k, config.top_p)


def _is_eos(token_B: Array, config: GenerationConfig) -> Array:
    if not config.eos_token_id:
        return jnp.zeros(token_B.shape, bool)
    return jnp.isin(token_B, jnp.asarray(config.eos_token_id, jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "out_sharding"))
def _generate(graphdef, params, rest, ids_BL: Array, mask_BL: Array, rng: Array, config: GenerationConfig,
              out_sharding: NamedSharding | None = None) -> Array:
    """New tokens ``[B, max_new_tokens]``: prefill, then a while loop of one-token decoding steps."""
    model = nnx.merge(graphdef, params, rest)
    model.eval()  # inference: no dropout (e.g. on LoRA adapters), whatever mode the caller's module is in
    batch, length = ids_BL.shape
    steps = config.max_new_tokens
    cache = model.init_cache(batch, length + steps - 1)
    last_B = length - 1 - jnp.argmax(mask_BL[:, ::-1] != 0, axis=1)  # Each row's last real prompt token.
    logits_B1V, cache = model.decode(ids_BL, cache, attention_mask_BT=mask_BL, logits_index_B=last_B)
    token_B = _next_token(logits_B1V[:, 0], jax.random.fold_in(rng, 0), config)
    tokens_BN = jnp.full((batch, steps), config.pad_token_id, jnp.int32).at[:, 0].set(token_B)

    def running(carry) -> Array:
        step, _, _, done_B, _ = carry
        return (step < steps) & ~jnp.all(done_B)

    def step_fn(carry):
        step, cache, token_B, done_B, tokens_BN = carry
        logits_B1V, cache = model.decode(token_B[:, None], cache, attention_mask_BT=~done_B[:, None])
        sampled_B = _next_token(logits_B1V[:, 0], jax.random.fold_in(rng, step), config)
        token_B = jnp.where(done_B, config.pad_token_id, sampled_B)
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, token_B[:, None], step, axis=1)
        return step + 1, cache, token_B, done_B | _is_eos(token_B, config), tokens_BN

    carry = (jnp.int32(1), cache, token_B, _is_eos(token_B, config), tokens_BN)
    tokens_BN = jax.lax.while_loop(running, step_fn, carry)[-1]
    return tokens_BN if out_sharding is None else jax.lax.with_sharding_constraint(tokens_BN, out_sharding)


def _replicated_on_mesh(params) -> NamedSharding | None:
    """Replicated on the mesh of weights spread over several devices, else None.

    With weights sharded across hosts, every process must hold all output tokens to read them back;
    left to the compiler, the output could stay split over devices another process owns.
    """
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def _check_shapes(model: nnx.Module, ids_BL, mask_BL) -> None:
    """What can be checked of the inputs at trace time: the model can decode, and the shapes."""
    if not (hasattr(model, "init_cache") and hasattr(model, "decode")):
        raise GenerationError(f"{type(model).__name__} has no init_cache()/decode(); generation needs a model with a "
                              "key/value cache such as easytrain.models.LlamaForCausalLM.")
    if len(ids_BL.shape) != 2:
        raise GenerationError(f"input_ids has shape {ids_BL.shape}; pass a [batch, length] array (see pad_prompts).")
    if mask_BL.shape != ids_BL.shape:
        raise GenerationError(f"attention_mask has shape {mask_BL.shape}; it must match input_ids {ids_BL.shape}.")


def _as_array(name: str, value) -> np.ndarray:
    try:
        return np.asarray(value, np.int32)
    except (ValueError, TypeError) as error:  # ragged lists: numpy's "inhomogeneous shape"
        raise GenerationError(f"{name} is not a [batch, length] array of ints ({error}); pad prompts of different "
                              "lengths with pad_prompts(prompts, pad_id) and pass the mask it returns.") from error


def _check_inputs(model: nnx.Module, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids_BL = _as_array("input_ids", input_ids)
    mask_BL = np.ones_like(ids_BL) if attention_mask is None else _as_array("attention_mask", attention_mask)
    _check_shapes(model, ids_BL, mask_BL)
    if empty := np.flatnonzero(mask_BL.sum(axis=1) == 0).tolist():
        raise GenerationError(f"attention_mask rows {empty} have no real token; give every prompt at least one.")
    _check_vocabulary(ids_BL, mask_BL, getattr(getattr(model, "config", None), "vocab_size", None))
    # Padding is never attended, but an id past the table embeds as NaN, and 0 * NaN reaches the real tokens.
    return np.where(mask_BL != 0, ids_BL, 0).astype(np.int32), mask_BL


def _check_vocabulary(ids_BL: np.ndarray, mask_BL: np.ndarray, vocab_size: int | None) -> None:
    """Real prompt ids must index the embedding table: inside the compiled program an id past it gives NaN
    logits and a negative one wraps around, both without an error."""
    if vocab_size is None:
        return
    outside_BL = (mask_BL != 0) & ((ids_BL < 0) | (ids_BL >= vocab_size))
    if outside_BL.any():
        row, column = (int(i) for i in np.argwhere(outside_BL)[0])
        raise GenerationError(
            f"input_ids row {row}, position {column} holds token id {int(ids_BL[row, column])}, outside the model's "
            f"vocabulary [0, {vocab_size}) (vocab_size {vocab_size}; {int(outside_BL.sum())} such id(s) in all). The "
            "tokenizer is likely larger than the model's vocabulary (tokens added to it, or another model's "
            "tokenizer): encode the prompts with the model's own tokenizer.")


@dataclasses.dataclass(frozen=True, repr=False)
class Default(Generic[T]):
    """A setting's default value, told apart from the same value passed: a ``generation_config`` fills only the
    settings a call leaves at their ``Default`` (a typed sentinel: the hints say what may be passed)."""

    value: T

    def __repr__(self) -> str:
        return f"Default({self.value!r})"


def _resolved_config(model: nnx.Module, generation_config: transformers.GenerationConfig | Mapping[str, Any] | None,
                     max_length: object, **arguments: Any) -> GenerationConfig:
    """`generate`'s and `generate_traced`'s one way to read their settings (``sampling_config.resolve_config``),
    their ids checked against `model`'s vocabulary."""
    from easytrain.sampling_config import resolve_config  # imported here: it imports from this module

    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    return resolve_config(generation_config, max_length, vocab_size=vocab_size, **arguments)


def generate(
    model: nnx.Module,
    input_ids: np.ndarray | Array,
    attention_mask: np.ndarray | Array | None = None,
    *,
    max_new_tokens: int | Default[None] = Default(None),
    do_sample: bool | Default[bool] = Default(False),
    temperature: float | Default[float] = Default(1.0),
    top_k: int | None | Default[None] = Default(None),
    top_p: float | None | Default[None] = Default(None),
    eos_token_id: int | Sequence[int] | None | Default[None] = Default(None),
    pad_token_id: int | None | Default[None] = Default(None),
    seed: int = 0,
    generation_config: transformers.GenerationConfig | Mapping[str, Any] | None = None,
    max_length: None = None,
) -> np.ndarray:
    """Continues each prompt of a padded batch; greedy unless ``do_sample``.

    Unlike transformers' ``generate``, nothing is read from the model's generation config and top-k is off
    unless asked for; pass ``generation_config=generation_config_of(model)`` (``easytrain.models.hf_load``) to
    decode as transformers would.

    Args:
        model: A model with ``init_cache``/``decode`` (``LlamaForCausalLM``); it is not modified. Its
            weights may be sharded on a mesh, across processes too: then every process calls with the
            same inputs and gets every row.
        input_ids: ``[B, L]`` prompts, left- or right-padded (see ``pad_prompts``).
        attention_mask: ``[B, L]``, 1 for real tokens, 0 for padding; default all real.
        max_new_tokens: Tokens generated per row (as in ``GenerationConfig``, like the next four).
        do_sample: Sample instead of taking the argmax.
        temperature: Divides the logits before filtering (sampling only).
        top_k: Keep only the k highest logits.
        top_p: Keep the smallest set of most likely tokens whose probability reaches top_p.
        eos_token_id: Id(s) that end a row; None generates exactly ``max_new_tokens`` everywhere.
        pad_token_id: Filler after a row's EOS; default the first EOS id (else 0).
        seed: Sampling seed; the same seed and inputs give the same tokens.
        generation_config: A ``transformers.GenerationConfig`` or the mapping of a ``generation_config.json``;
            it fills the settings above that the call leaves unset, as transformers does (when sampling, its
            temperature/top_k/top_p, else transformers' defaults: top_k=50); fields that would change the
            tokens but are not implemented here (repetition_penalty, min_p, num_beams > 1, ...) raise
            ``GenerationError``. Default None: the arguments alone.
        max_length: Not supported (refused): pass ``max_new_tokens``.

    Returns:
        int32 ``[B, max_new_tokens]`` new tokens only: each row's EOS is included, then pad.
    """
    config = _resolved_config(model, generation_config, max_length, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id)
    if not _is_int(seed):  # else JAX fails on it inside jax.random.key, with a message that names no argument
        raise GenerationError(f"seed = {seed!r} must be an int (the same seed and inputs give the same tokens).")
    ids_BL, mask_BL = _check_inputs(model, input_ids, attention_mask)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens_BN = _generate(graphdef, params, rest, ids_BL, mask_BL, jax.random.key(seed), config=config,
                          out_sharding=_replicated_on_mesh(params))
    return np.asarray(tokens_BN)


class Generated(NamedTuple):
    """`generate_traced`'s result: int32 ``[B, max_new_tokens]`` new tokens, and 1 where a token was generated
    (each row's tokens up to and including its first EOS), 0 on the pad after it."""

    tokens: Array
    mask: Array


def generate_traced(
    model: nnx.Module,
    input_ids: Array,
    attention_mask: Array | None,
    rng: Array,
    *,
    max_new_tokens: int | Default[None] = Default(None),
    do_sample: bool | Default[bool] = Default(False),
    temperature: float | Default[float] = Default(1.0),
    top_k: int | None | Default[None] = Default(None),
    top_p: float | None | Default[None] = Default(None),
    eos_token_id: int | Sequence[int] | None | Default[None] = Default(None),
    pad_token_id: int | None | Default[None] = Default(None),
    generation_config: transformers.GenerationConfig | Mapping[str, Any] | None = None,
) -> Generated:
    """`generate` for use inside a compiled program, e.g. rollouts in a train step: arrays and a key in, arrays out.

    The same decoding (and for the same key as ``generate``'s ``jax.random.key(seed)``, the same tokens), with no
    host transfer: ``input_ids`` and ``attention_mask`` may be traced, ``model`` may hold traced weights (e.g.
    ``state.model(train=False)``); the settings are Python values, static for the program. Only shapes are
    checked here: every row needs a real token and every real id must lie in the vocabulary (``generate`` checks
    those on the host). The module always decodes in eval mode.

    Args:
        model: A model with ``init_cache``/``decode``; not modified.
        input_ids: ``[B, L]`` prompts, left- or right-padded; ids under a 0 of the mask are never read.
        attention_mask: ``[B, L]``, nonzero for real tokens; None: all real.
        rng: A PRNG key (typed, or raw ``uint32[2]`` key data), new at every call that should sample anew: in a
            train step ``state.stream_rng("rollout")`` (not ``state.rng``, the run's base key, the same every step).
        max_new_tokens: ...and the other settings, and ``generation_config``, as in ``generate``: the same config
            decodes the same way in both, and its unimplemented fields are refused here, before tracing.

    Returns:
        ``Generated(tokens, mask)``, both int32 ``[B, max_new_tokens]``.
    """
    config = _resolved_config(model, generation_config, None, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id)
    ids_BL = jnp.asarray(input_ids, jnp.int32)
    mask_BL = jnp.ones_like(ids_BL) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    _check_shapes(model, ids_BL, mask_BL)
    if not jax.dtypes.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens_BN = _generate(graphdef, params, rest, jnp.where(mask_BL != 0, ids_BL, 0), mask_BL, rng, config=config)
    ended_BN = _is_eos(tokens_BN, config)
    after_eos_BN = (jnp.cumsum(ended_BN, axis=1) - ended_BN) > 0
    return Generated(tokens_BN, (~after_eos_BN).astype(jnp.int32))


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int, *, side: str = "left", multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists packed into ``[N, L]`` ids and attention mask; L is the longest rounded up to ``multiple``."""
    if side not in ("left", "right"):
        raise GenerationError(f"side = {side!r}; choose 'left' or 'right'.")
    if not _is_int(multiple) or multiple < 1:
        raise GenerationError(f"multiple = {multiple!r} must be an int >= 1 (1: pad to the longest prompt only).")
    if not _is_int(pad_id):  # None: a tokenizer without a pad token
        raise GenerationError(f"pad_id = {pad_id!r} must be an int token id (a tokenizer without a pad token has "
                              "None: pass its eos_token_id).")
    if len(prompts) == 0:
        raise GenerationError("prompts is empty; pass at least one prompt (a list of token ids).")
    prompts = [_prompt_ids(index, prompt) for index, prompt in enumerate(prompts)]
    longest = max(len(p) for p in prompts)
    length = -(-longest // multiple) * multiple
    ids_NL = np.full((len(prompts), length), pad_id, np.int32)
    mask_NL = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        span = slice(length - len(prompt), length) if side == "left" else slice(0, len(prompt))
        ids_NL[row, span], mask_NL[row, span] = prompt, 1
    return ids_NL, mask_NL


def _prompt_ids(index: int, prompt: Sequence[int]) -> np.ndarray:
    """One prompt as a 1-D array of ids: a float id would be truncated into another token without an error."""
    ids = np.asarray(prompt)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise GenerationError(f"prompts[{index}] = {reprlib.repr(prompt)} is not a list of int token ids; pass a "
                              "list of prompts, each a list of ids (one prompt: [ids]).")
    return ids


def greedy_complete(
    model: nnx.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int, eos_id: int | None = None
) -> np.ndarray:
    """The greedy continuations of each prompt, ``[N, max_new_tokens]``; after ``eos_id`` (kept) come ``pad_id``s,
    an id of the model (`generate` refuses one past its vocabulary). Prompt lengths are bucketed to multiples of 16
    so varied prompt sets share compilations."""
    ids_NL, mask_NL = pad_prompts(prompts, pad_id, multiple=16)
    return generate(model, ids_NL, mask_NL, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
