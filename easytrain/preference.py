"""Preference losses (DPO and relatives), and the registry `DPOTrainer` reads them from.

Each loss is a pure function of per-pair arrays (`*_B`: one value per chosen/rejected pair) and returns
the per-pair loss `loss_B`; the trainer sums it over pairs and divides once by the global pair count
(`easytrain.losses`). Log-probabilities are summed over completion tokens (`sequence_logps`, with `token_logps` and
`token_logps_from_hidden` from `easytrain.sequence_logps`, re-exported here); losses on
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

import inspect
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from easytrain.sequence_logps import sequence_logps, token_logps, token_logps_from_hidden

# The log-probabilities are `easytrain.sequence_logps`'s, re-exported (and documented) here. The tables that
# `__getattr__` computes when read are left out: a star import would freeze them.
__all__ = [
    "token_logps", "token_logps_from_hidden", "sequence_logps", "implicit_rewards", "dpo_sigmoid_loss", "ipo_loss",
    "hinge_loss", "robust_loss", "bco_pair_loss", "running_mean", "sppo_hard_loss", "nca_pair_loss", "apo_zero_loss",
    "apo_down_loss", "sft_loss", "simpo_loss", "orpo_loss", "PairLogps", "PREFERENCE_LOSSES", "HYPER_PARAMETERS",
    "reference_free_losses", "label_smoothing_readers", "gamma_readers", "per_token_losses", "register_preference_loss",
    "reports_per_token", "reported_logps", "combined_loss"]

Array = jax.Array
log_sigmoid, sigmoid = jax.nn.log_sigmoid, jax.nn.sigmoid


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


def gamma_readers() -> frozenset[str]:
    """Losses that read SimPO's margin `gamma` (`simpo_gamma`)."""
    return _reading("gamma")


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
