"""Preference losses (DPO and relatives) and the sequence log-probabilities they are computed from.

Each loss is a pure function of per-pair arrays (`*_B`: one value per chosen/rejected pair) and returns
the per-pair loss `loss_B`; the trainer sums it over pairs and divides once by the global pair count
(`easytrain.losses`). Log-probabilities are summed over completion tokens (`sequence_logps`); losses on
per-token averages take the token counts `chosen_len_B`, `rejected_len_B`. Definitions follow TRL's `DPOTrainer`,
`CPOTrainer` for SimPO and `ORPOTrainer`; docs/dpo.md lists where they differ from TRL 1.16 (`sigmoid` with
`label_smoothing`, `bco_pair`'s δ, the `sft` average). Notation: a = πc − rc and b = πr − rr (chosen and rejected
log-ratios to the reference), m = a − b.

Example (uniform logits over 8 tokens; the policy is the reference, so DPO gives ln 2 and SFT ln 8):
    >>> import jax.numpy as jnp
    >>> logps_BT = token_logps(jnp.zeros((2, 3, 8)), jnp.zeros((2, 3), jnp.int32), chunk_size=4)
    >>> logps_B, len_B = sequence_logps(logps_BT, jnp.ones((2, 3)))  # rows: chosen, rejected
    >>> pair = PairLogps(logps_B[:1], logps_B[1:], logps_B[:1], logps_B[1:], len_B[:1], len_B[1:])
    >>> loss_B = combined_loss(["sigmoid", "sft"], [1.0, 0.5], pair, beta=0.1)
    >>> round(float(loss_B[0]), 4)  # ln 2 + ln 8 / 2
    1.7329
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from easytrain.models.maxima import shift_max

Array = jax.Array
log_sigmoid, sigmoid = jax.nn.log_sigmoid, jax.nn.sigmoid


def _chunked_logps(chunk_fn: Callable[..., Array], operands: Any, targets_BT: Array,
                   vocab_size: int, chunk_size: int) -> tuple[Array, Array]:
    """(logit[target], logsumexp(logits)) in float32, the logsumexp online (running max, rescaled sum),
    reading one [B, T, C] vocabulary chunk at a time from `chunk_fn(operands, offset, C)`."""
    size = min(chunk_size, vocab_size)

    def body(carry, i):
        max_BT, sum_BT, target_BT = carry
        operands_i = _tied_to_step(operands, i)
        start = i * size
        offset = jnp.minimum(start, vocab_size - size)  # a short last chunk overlaps the one before it
        cols_C = offset + jnp.arange(size)
        new_C = cols_C >= start  # columns no earlier chunk has counted
        chunk_BTC = jnp.where(new_C, chunk_fn(operands_i, offset, size).astype(jnp.float32), -jnp.inf)
        new_max_BT = lax.stop_gradient(jnp.maximum(max_BT, shift_max(chunk_BTC)))  # logsumexp does not depend on it
        shift_BT = _finite_or_zero(new_max_BT)  # no −inf − (−inf) while a row has seen only −inf logits
        sum_BT = sum_BT * jnp.exp(max_BT - shift_BT) + jnp.exp(chunk_BTC - shift_BT[..., None]).sum(-1)
        hit_BTC = new_C & (cols_C == targets_BT[..., None])
        target_BT = target_BT + jnp.where(hit_BTC, chunk_BTC, 0.0).sum(-1)  # one non-zero term: exact
        return (new_max_BT, sum_BT, target_BT), None

    zeros_BT = jnp.zeros(targets_BT.shape, jnp.float32)
    n_chunks = -(-vocab_size // size)
    (max_BT, sum_BT, target_BT), _ = lax.scan(jax.checkpoint(body, prevent_cse=False),
                                              (zeros_BT - jnp.inf, zeros_BT, zeros_BT), jnp.arange(n_chunks))
    return target_BT, _finite_or_zero(max_BT) + jnp.log(sum_BT)


@jax.custom_vjp
def _tied_to_step(operands: Any, i: Array) -> Any:
    """`operands`, made to look as if they depended on the loop step `i`: keeps XLA from hoisting whole-array
    work out of the loop (XLA:CPU upcasts all of a bfloat16 operand to slice it).

    The barrier is for the forward pass only; its cotangent passes straight through. jax transposes
    `optimization_barrier` into a barrier on the cotangents, and jax 0.11 passes the gradient accumulators
    through it as well, which keeps XLA from adding each chunk's gradient into them in place: one more whole
    `[D, V]` buffer for an unembedding's gradient (`tests/test_preference_losses.py`)."""
    return lax.optimization_barrier((operands, i))[0]


def _tied_forward(operands: Any, i: Array) -> tuple[Any, None]:
    return _tied_to_step(operands, i), None


def _untied_backward(_: None, cotangent: Any) -> tuple[Any, None]:
    return cotangent, None


_tied_to_step.defvjp(_tied_forward, _untied_backward)


def _finite_or_zero(x: Array) -> Array:
    return jnp.where(jnp.isneginf(x), 0.0, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_logps(logits_BTV: Array, targets_BT: Array, chunk_size: int = 4096) -> Array:
    """Float32 log p(target) = logits[target] − logsumexp(logits), never holding a float32 [B, T, V].

    The logsumexp runs over `chunk_size` vocabulary columns at a time (any `chunk_size`, dividing V or
    not); the gradient `g·(onehot(target) − softmax)` is one fused elementwise pass in the logits' dtype.

    Args:
        logits_BTV: next-token logits, any float dtype (bfloat16 is read in chunks, upcast per chunk).
        targets_BT: int token ids; ids outside [0, V) give −logsumexp (mask them in `sequence_logps`).
        chunk_size: vocabulary columns per step; the temporary memory is about 2·B·T·chunk_size·4 bytes.
    Returns:
        logps_BT: float32.
    """
    return _token_logps_fwd(logits_BTV, targets_BT, chunk_size)[0]


def _token_logps_fwd(logits_BTV, targets_BT, chunk_size):
    target_BT, log_z_BT = _chunked_logps(lambda x, offset, size: lax.dynamic_slice_in_dim(x, offset, size, -1),
                                         logits_BTV, targets_BT, logits_BTV.shape[-1], chunk_size)
    return target_BT - log_z_BT, (logits_BTV, targets_BT, log_z_BT)


def _token_logps_bwd(chunk_size, residuals, g_BT):
    """g·(onehot(target) − softmax): one elementwise pass, written straight in the logits' dtype."""
    logits_BTV, targets_BT, log_z_BT = residuals
    onehot_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
    softmax_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - log_z_BT[..., None])
    return ((onehot_BTV - softmax_BTV) * g_BT[..., None]).astype(logits_BTV.dtype), None


token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def token_logps_from_hidden(hidden_BTD: Array, unembed: Array | Callable[..., Array],
                            targets_BT: Array, chunk_size: int = 4096,
                            vocab_size: int | None = None) -> Array:
    """`token_logps` of `hidden @ unembed` projected one vocabulary chunk at a time: no [B, T, V] ever.

    Each chunk's logits are recomputed in the backward pass (`jax.checkpoint`), so neither pass keeps more
    than a couple of [B, T, chunk_size] float32 blocks; plain JAX autodiff, so `unembed` may be a module.

    Args:
        hidden_BTD: final hidden states (after the last norm).
        unembed: the output projection `unembed_DV`, or a callable `(hidden_BTD, offset, size) -> logits_BTC`
            giving the logits of vocabulary columns [offset, offset + size) (then pass `vocab_size`).
        targets_BT: as in `token_logps`.
        chunk_size: as in `token_logps`.
        vocab_size: the vocabulary size, needed when `unembed` is a callable.
    Returns:
        logps_BT: float32.
    """
    if callable(unembed):
        if vocab_size is None:
            raise ValueError("token_logps_from_hidden: pass vocab_size with a callable unembed")
        project, operands = unembed, hidden_BTD
    else:
        vocab_size, operands = unembed.shape[1], (hidden_BTD, unembed)

        def project(operands, offset, size):
            hidden_BTD, unembed_DV = operands
            unembed_DC = lax.dynamic_slice_in_dim(unembed_DV, offset, size, 1)
            return jnp.dot(hidden_BTD, unembed_DC, preferred_element_type=jnp.float32)
    target_BT, log_z_BT = _chunked_logps(project, operands, targets_BT, vocab_size, chunk_size)
    return target_BT - log_z_BT


def sequence_logps(logps_BT: Array, mask_BT: Array) -> tuple[Array, Array]:
    """Σ_t logps[b, t] over completion tokens (mask 1) and their count; padding values never leak in.

    The sum is a float32 reduction over T, so a different padding length can reassociate it (rounding only).
    """
    keep_BT = mask_BT.astype(bool)
    return jnp.sum(jnp.where(keep_BT, logps_BT, 0.0), -1), jnp.sum(keep_BT, -1, dtype=jnp.float32)


def implicit_rewards(policy_logps_B: Array, ref_logps_B: Array, beta: float) -> Array:
    """DPO's implicit reward β·(log π − log π_ref) of each sequence (for metrics)."""
    return beta * (policy_logps_B - ref_logps_B)


def _smoothed_logistic(z_B: Array, label_smoothing: float) -> Array:
    return -(1 - label_smoothing) * log_sigmoid(z_B) - label_smoothing * log_sigmoid(-z_B)


def _log_ratios(pc_B: Array, pr_B: Array, rc_B: Array, rr_B: Array) -> tuple[Array, Array]:
    """(a, b) = (πc − rc, πr − rr)."""
    return pc_B - rc_B, pr_B - rr_B


def _margin(pc_B: Array, pr_B: Array, rc_B: Array, rr_B: Array) -> Array:
    """m = (πc − πr) − (rc − rr), in TRL's order (exactly 0 when the policy is the reference)."""
    return (pc_B - pr_B) - (rc_B - rr_B)


def _per_token(logps_B: Array, len_B: Array) -> Array:
    return logps_B / jnp.maximum(len_B, 1)


def dpo_sigmoid_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
                     ref_rejected_logps_B: Array, *, beta: float, label_smoothing: float = 0.0) -> Array:
    """DPO (Rafailov et al. 2023), conservative with ε > 0 (cDPO): −(1−ε)·logσ(βm) − ε·logσ(−βm).

    TRL up to 0.28 smoothed `sigmoid` the same way; TRL 0.29 and later ignore `label_smoothing` for it (ε = 0 here
    gives their loss)."""
    m_B = _margin(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    return _smoothed_logistic(beta * m_B, label_smoothing)


def ipo_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
             ref_rejected_logps_B: Array, chosen_len_B: Array, rejected_len_B: Array, *, beta: float) -> Array:
    """IPO (Azar et al. 2023, eq. 17): (m̄ − 1/(2β))², m̄ = m of per-token average log-probs, as TRL does."""
    m_B = _margin(_per_token(policy_chosen_logps_B, chosen_len_B), _per_token(policy_rejected_logps_B, rejected_len_B),
                  _per_token(ref_chosen_logps_B, chosen_len_B), _per_token(ref_rejected_logps_B, rejected_len_B))
    return (m_B - 1 / (2 * beta)) ** 2


def hinge_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
               ref_rejected_logps_B: Array, *, beta: float) -> Array:
    """SLiC hinge (Zhao et al. 2023): relu(1 − βm)."""
    m_B = _margin(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    return jax.nn.relu(1 - beta * m_B)


def robust_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
                ref_rejected_logps_B: Array, *, beta: float, label_smoothing: float = 0.0) -> Array:
    """Robust DPO (Chowdhury et al. 2024), unbiased under a label-flip rate ε < 1/2:
    (−(1−ε)·logσ(βm) + ε·logσ(−βm)) / (1 − 2ε)."""
    if isinstance(label_smoothing, (int, float)) and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    z_B = beta * _margin(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    return (-(1 - label_smoothing) * log_sigmoid(z_B) + label_smoothing * log_sigmoid(-z_B)) / (1 - 2 * label_smoothing)


def bco_pair_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
                  ref_rejected_logps_B: Array, *, beta: float, delta: Array | float) -> Array:
    """BCO on pairs (Jung et al. 2024): −logσ(βa − δ) − logσ(−(βb − δ)); δ is the trainer's running mean of
    the rewards βa, βb of the pairs trained on before this step (`running_mean`), so the accumulation split never
    changes the loss. TRL up to 0.28 also folded in the current micro-batch; TRL 0.29 and later have no δ (δ = 0)."""
    a_B, b_B = _log_ratios(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    return -log_sigmoid(beta * a_B - delta) - log_sigmoid(-(beta * b_B - delta))


def running_mean(mean: Array, count: Array, total: Array, added: Array) -> tuple[Array, Array]:
    """The mean of `count` values updated with `added` more that sum to `total`: `mean + (total - added·mean) /
    (count + added)`, which keeps float32 precision over a long run where a running sum would lose it."""
    new_count = count + added
    return mean + (total - added * mean) / jnp.maximum(new_count, 1.0), new_count


def sppo_hard_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
                   ref_rejected_logps_B: Array, *, beta: float) -> Array:
    """SPPO with hard win probabilities (Wu et al. 2024, eq. 4.7, P = 1 and 0): (a − 1/(2β))² + (b + 1/(2β))²."""
    a_B, b_B = _log_ratios(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    return (a_B - 0.5 / beta) ** 2 + (b_B + 0.5 / beta) ** 2


def nca_pair_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
                  ref_rejected_logps_B: Array, *, beta: float) -> Array:
    """NCA on pairs (Chen et al. 2024): −logσ(βa) − ½·logσ(−βa) − ½·logσ(−βb)."""
    a_B, b_B = _log_ratios(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    return -log_sigmoid(beta * a_B) - 0.5 * log_sigmoid(-beta * a_B) - 0.5 * log_sigmoid(-beta * b_B)


def apo_zero_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
                  ref_rejected_logps_B: Array, *, beta: float) -> Array:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7; chosen better than the policy's own): (1 − σ(βa)) + σ(βb)."""
    a_B, b_B = _log_ratios(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    return (1 - sigmoid(beta * a_B)) + sigmoid(beta * b_B)


def apo_down_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, ref_chosen_logps_B: Array,
                  ref_rejected_logps_B: Array, *, beta: float) -> Array:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8; chosen worse than the policy's own): σ(βa) + (1 − σ(β(a − b)))."""
    a_B, b_B = _log_ratios(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    return sigmoid(beta * a_B) + (1 - sigmoid(beta * (a_B - b_B)))


def sft_loss(policy_chosen_logps_B: Array, chosen_len_B: Array) -> Array:
    """Per-token NLL of the chosen completion, −πc/|c| (the NLL term of RPO, Pang et al. 2024)."""
    return -_per_token(policy_chosen_logps_B, chosen_len_B)


def simpo_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, chosen_len_B: Array,
               rejected_len_B: Array, *, beta: float, gamma: float = 0.5, label_smoothing: float = 0.0) -> Array:
    """SimPO (Meng et al. 2024), reference-free: −(1−ε)·logσ(z) − ε·logσ(−z), z = β(πc/|c| − πr/|r|) − γ."""
    margin_B = _per_token(policy_chosen_logps_B, chosen_len_B) - _per_token(policy_rejected_logps_B, rejected_len_B)
    return _smoothed_logistic(beta * margin_B - gamma, label_smoothing)


def _log1mexp(x: Array) -> Array:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012); x is kept below 0 so it stays finite."""
    x = jnp.minimum(x, -jnp.finfo(jnp.result_type(x, jnp.float32)).tiny)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(policy_chosen_logps_B: Array, policy_rejected_logps_B: Array, chosen_len_B: Array,
              rejected_len_B: Array, *, beta: float) -> Array:
    """ORPO (Hong et al. 2024), reference-free: NLL + λ·odds-ratio term (λ = β) on per-token averages p̄:
    −p̄c − β·logσ((p̄c − p̄r) − (log(1 − e^p̄c) − log(1 − e^p̄r)))."""
    chosen_B = _per_token(policy_chosen_logps_B, chosen_len_B)
    rejected_B = _per_token(policy_rejected_logps_B, rejected_len_B)
    log_odds_B = (chosen_B - rejected_B) - (_log1mexp(chosen_B) - _log1mexp(rejected_B))
    return -chosen_B - beta * log_sigmoid(log_odds_B)


class PairLogps(NamedTuple):
    """Per-pair inputs of the preference losses; the reference fields may be None for reference-free losses."""

    policy_chosen_logps_B: Array
    policy_rejected_logps_B: Array
    ref_chosen_logps_B: Array | None = None
    ref_rejected_logps_B: Array | None = None
    chosen_len_B: Array | None = None
    rejected_len_B: Array | None = None


PREFERENCE_LOSSES: dict[str, Callable[..., Array]] = {
    "sigmoid": dpo_sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_loss,
    "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss, "nca_pair": nca_pair_loss,
    "apo_zero": apo_zero_loss, "apo_down": apo_down_loss, "sft": sft_loss, "simpo": simpo_loss,
    "orpo": orpo_loss,
}
#: Losses whose metrics are of per-token means (`reports_per_token`): the built-ins' and those registered `per_token`.
_PER_TOKEN_NAMES = {"ipo", "sft", "simpo", "orpo"}
_REFERENCE = ("ref_chosen_logps_B", "ref_rejected_logps_B")
_LENGTHS = ("chosen_len_B", "rejected_len_B")
#: The keywords `DPOTrainer` passes a loss besides the `PairLogps` fields.
HYPER_PARAMETERS = ("beta", "label_smoothing", "gamma", "delta")


def _reading(*params: str) -> frozenset[str]:
    """The registered losses whose signature names any of `params`."""
    return frozenset(name for name, fn in PREFERENCE_LOSSES.items()
                     if set(params) & set(inspect.signature(fn).parameters))


def reference_free_losses() -> frozenset[str]:
    """Losses that read no reference log-probabilities (no reference model runs for them), read from the signatures
    of the losses registered now: one added after import counts too."""
    return frozenset(PREFERENCE_LOSSES) - _reading(*_REFERENCE)


def label_smoothing_readers() -> frozenset[str]:
    """Losses that read `label_smoothing` (the others compute the same loss whatever its value)."""
    return _reading("label_smoothing")


def per_token_losses() -> frozenset[str]:
    """Losses that read per-token mean log-probabilities rather than sums."""
    return frozenset(_PER_TOKEN_NAMES & set(PREFERENCE_LOSSES))


def __getattr__(name: str) -> frozenset[str]:
    """`REFERENCE_FREE`, `READS_LABEL_SMOOTHING` and `PER_TOKEN_LOSSES`, computed when read (frozen at import, they
    missed every loss registered later)."""
    tables = {"REFERENCE_FREE": reference_free_losses, "READS_LABEL_SMOOTHING": label_smoothing_readers,
              "PER_TOKEN_LOSSES": per_token_losses}
    if name not in tables:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return tables[name]()


def register_preference_loss(name: str, fn: Callable[..., Array], *, reference_free: bool = False,
                             per_token: bool = False, replace: bool = False) -> None:
    """Add `fn` as the preference loss `name` (a `DPOArguments.loss_type` entry), in every table the trainer reads.

    `fn` takes `PairLogps` fields and `HYPER_PARAMETERS` by name and returns the per-pair loss; it reads
    `label_smoothing` when its signature names it. `reference_free`: it reads no `ref_*` log-probs, so no reference
    model is built and rewards are β·policy log-probs. `per_token`: its metrics report per-token means (as `simpo`'s),
    not sums; it reads `chosen_len_B` and `rejected_len_B`.

    Raises:
        ValueError: `name` taken (unless `replace`), a flag its signature contradicts, or a parameter without default
            that the trainer never passes.
    """
    params, passed = inspect.signature(fn).parameters, set(PairLogps._fields) | set(HYPER_PARAMETERS)
    unknown = [p for p, spec in params.items() if p not in passed and spec.default is inspect.Parameter.empty
               and spec.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    reads = [p for p in _REFERENCE if p in params]
    for failed, problem in [
        (name in PREFERENCE_LOSSES and not replace, "is already registered; choose another name, or pass replace=True"),
        (unknown, f"needs {unknown}, which the trainer never passes; give them a default, or read only "
                  f"{', '.join(sorted(passed))}"),
        (reads and reference_free, f"reads {reads}, so it is not reference-free; drop reference_free=True"),
        (not reads and not reference_free, f"reads no reference log-probs ({', '.join(_REFERENCE)}): pass "
                                           "reference_free=True, or a reference model is built and run for nothing"),
        (per_token and not set(_LENGTHS) <= set(params), f"is per_token, which reports per-token means from "
                                                         f"{' and '.join(_LENGTHS)}; add them, or drop per_token")]:
        if failed:
            raise ValueError(f"preference loss {name!r} {problem}.")
    PREFERENCE_LOSSES[name] = fn
    (_PER_TOKEN_NAMES.add if per_token else _PER_TOKEN_NAMES.discard)(name)


def reports_per_token(names: Sequence[str]) -> bool:
    """Whether the `rewards/*` and `logps/*` metrics are of per-token mean log-probs rather than sums: when every
    loss reads per-token means and one is `ipo`, `simpo` or `orpo`, so the metrics compare what the loss compares
    (as TRL's CPOTrainer and ORPOTrainer report `simpo` and `orpo`; TRL's DPOTrainer reported `ipo` so up to 0.28
    and reports sums since 0.29). `sft` alone and any loss on sums keep the sums."""
    return set(names) <= per_token_losses() and set(names) != {"sft"}


def reported_logps(names: Sequence[str], logps_B2: Array, lengths_B2: Array) -> Array:
    """`[B, 2]` log-probs as the metrics report them for `names` (`reports_per_token`)."""
    return _per_token(logps_B2, lengths_B2) if reports_per_token(names) else logps_B2


def combined_loss(names: str | Sequence[str], weights: Sequence[float] | None, inputs: PairLogps,
                  **hyper: float | Array) -> Array:
    """`Σ_k weights[k] · PREFERENCE_LOSSES[names[k]](inputs, hyper)`: TRL's `loss_type` list + `loss_weights`.

    Each loss takes the fields of `inputs` and the `hyper` keywords (`beta`, `label_smoothing`, `gamma`,
    `delta`) it names; `weights=None` weighs every loss 1.

    Raises:
        ValueError: an unknown loss name or hyper-parameter, a weights/names length mismatch, or an input or
            hyper-parameter a chosen loss needs that is missing.
    """
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if not names:
        raise ValueError(f"combined_loss needs at least one loss; valid: {sorted(PREFERENCE_LOSSES)}")
    if len(weights) != len(names):
        raise ValueError(f"need one weight per loss, got {len(weights)} weights for losses {names}")
    for name in names:
        if name not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {name!r}; valid: {sorted(PREFERENCE_LOSSES)}")
    signatures = {name: inspect.signature(fn).parameters for name, fn in PREFERENCE_LOSSES.items()}
    known = {p for params in signatures.values() for p in params} - set(PairLogps._fields)
    if unknown := sorted(set(hyper) - known):
        raise ValueError(f"unknown preference-loss hyper-parameter(s) {unknown}; valid: {sorted(known)}")
    available = {**{k: v for k, v in inputs._asdict().items() if v is not None}, **hyper}
    total_B = 0.0
    for name, weight in zip(names, weights):
        params = signatures[name]
        missing = [p for p, spec in params.items() if p not in available and spec.default is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"preference loss {name!r} needs {missing}")
        total_B = total_B + weight * PREFERENCE_LOSSES[name](**{p: available[p] for p in params if p in available})
    return total_B
