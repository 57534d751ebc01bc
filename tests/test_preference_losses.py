"""Preference losses and chunked sequence log-probabilities against float64 NumPy formulas.

The NumPy references are written from the papers' (and TRL's) formulas and never call easytrain.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytrain import preference as P

BETA, EPS, GAMMA, DELTA = 0.3, 0.15, 0.7, 0.05
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- NumPy references (float64)

def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_losses(pc, pr, rc, rr, lc, lr, beta=BETA, eps=EPS, gamma=GAMMA, delta=DELTA):
    """Every loss of TRL's DPOTrainer (plus CPO's SimPO and ORPO), per pair, in float64."""
    m = (pc - pr) - (rc - rr)
    a, b = pc - rc, pr - rr
    m_avg = (pc / lc - pr / lr) - (rc / lc - rr / lr)
    avg_c, avg_r = pc / lc, pr / lr
    log_odds = (avg_c - avg_r) - (np.log(-np.expm1(avg_c)) - np.log(-np.expm1(avg_r)))
    return {
        "sigmoid": -(1 - eps) * np_log_sigmoid(beta * m) - eps * np_log_sigmoid(-beta * m),
        "ipo": (m_avg - 1 / (2 * beta)) ** 2,
        "hinge": np.maximum(0.0, 1 - beta * m),
        "robust": (-(1 - eps) * np_log_sigmoid(beta * m) + eps * np_log_sigmoid(-beta * m)) / (1 - 2 * eps),
        "bco_pair": -np_log_sigmoid(beta * a - delta) - np_log_sigmoid(-(beta * b - delta)),
        "sppo_hard": (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2,
        "nca_pair": -np_log_sigmoid(beta * a) - 0.5 * np_log_sigmoid(-beta * a) - 0.5 * np_log_sigmoid(-beta * b),
        "apo_zero": (1 - np_sigmoid(beta * a)) + np_sigmoid(beta * b),
        "apo_down": np_sigmoid(beta * a) + (1 - np_sigmoid(beta * (a - b))),
        "sft": -pc / lc,
        "simpo": (-(1 - eps) * np_log_sigmoid(beta * (avg_c - avg_r) - gamma)
                  - eps * np_log_sigmoid(-(beta * (avg_c - avg_r) - gamma))),
        "orpo": -avg_c - beta * np_log_sigmoid(log_odds),
    }


def np_token_logps(logits, targets):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.take_along_axis(logits, targets[..., None], -1)[..., 0] - log_z


def naive_token_logps(logits_BTV, targets_BT):
    """The direct JAX version the chunked one replaces: a float32 log_softmax over all of [B, T, V]."""
    log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pairs():
    """Summed completion log-probs of 64 pairs (float32), reference close to the policy, and token counts."""
    rng = np.random.default_rng(0)
    lc, lr = rng.integers(3, 40, 64), rng.integers(3, 40, 64)
    pc, pr = -lc * rng.uniform(0.2, 2.0, 64), -lr * rng.uniform(0.2, 2.0, 64)
    rc, rr = pc + rng.normal(0, 3, 64), pr + rng.normal(0, 3, 64)
    return tuple(np.asarray(x, np.float32) for x in (pc, pr, rc, rr, lc, lr))


def call(name, pairs, **hyper):
    pc, pr, rc, rr, lc, lr = pairs
    inputs = P.PairLogps(pc, pr, rc, rr, lc, lr)
    defaults = {"beta": BETA, "label_smoothing": EPS, "gamma": GAMMA, "delta": DELTA}
    params = inspect.signature(P.PREFERENCE_LOSSES[name]).parameters
    kwargs = {k: v for k, v in {**inputs._asdict(), **defaults, **hyper}.items() if k in params}
    return np.asarray(P.PREFERENCE_LOSSES[name](**kwargs))


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("name", sorted(P.PREFERENCE_LOSSES))
def test_loss_matches_numpy_formula(name, pairs):
    expected = np_losses(*(x.astype(np.float64) for x in pairs))[name]
    got = call(name, pairs)
    assert got.shape == (64,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=name)


def test_registry_covers_every_reference_formula():
    assert set(P.PREFERENCE_LOSSES) == set(np_losses(-1.0, -1.0, -1.0, -1.0, 1.0, 1.0))


def test_reference_free_is_exactly_the_losses_that_read_no_reference():
    free = {name for name, fn in P.PREFERENCE_LOSSES.items()
            if not {"ref_chosen_logps_B", "ref_rejected_logps_B"} & set(inspect.signature(fn).parameters)}
    assert P.REFERENCE_FREE == free == {"sft", "simpo", "orpo"}


def test_dpo_is_exactly_ln2_when_policy_is_reference(pairs):
    # m = (πc − πr) − (rc − rr) is exactly 0, and −logσ(0) = softplus(0) = log1p(1) rounds to float32 ln 2.
    pc, pr = pairs[:2]
    loss = np.asarray(P.dpo_sigmoid_loss(pc, pr, pc, pr, beta=BETA))
    assert loss.dtype == np.float32 and np.all(loss == np.float32(np.log(2))), loss
    smoothed = np.asarray(P.dpo_sigmoid_loss(pc, pr, pc, pr, beta=BETA, label_smoothing=EPS))
    np.testing.assert_array_max_ulp(smoothed, np.full_like(smoothed, np.log(2)), maxulp=1)  # (1−ε)·ln2 + ε·ln2


def test_zero_label_smoothing_is_plain_dpo(pairs):
    pc, pr, rc, rr = (x.astype(np.float64) for x in pairs[:4])
    plain = -np_log_sigmoid(BETA * ((pc - pr) - (rc - rr)))
    np.testing.assert_allclose(call("sigmoid", pairs, label_smoothing=0.0), plain, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(call("robust", pairs, label_smoothing=0.0),
                                  call("sigmoid", pairs, label_smoothing=0.0))


def test_orpo_log1mexp_is_stable_near_zero_and_far_below():
    # average log-probs of -1e-6 (a near-certain completion) and -60 (an impossible one) stay finite.
    pc, pr = np.float32([-1e-6, -60.0, -3.0]), np.float32([-60.0, -1e-6, -1e-30])
    loss = np.asarray(P.orpo_loss(pc, pr, np.ones(3), np.ones(3), beta=BETA))
    assert np.all(np.isfinite(loss))
    expected = np_losses(pc.astype(np.float64), pr.astype(np.float64), 0, 0, 1.0, 1.0)["orpo"]
    np.testing.assert_allclose(loss[:2], expected[:2], rtol=RTOL)


def test_combined_loss_is_the_weighted_sum(pairs):
    inputs = P.PairLogps(*pairs)
    names, weights = ["sigmoid", "sft", "bco_pair"], [1.0, 0.25, 0.5]
    got = np.asarray(P.combined_loss(names, weights, inputs, beta=BETA, label_smoothing=EPS, delta=DELTA))
    expected = sum(w * call(n, pairs) for n, w in zip(names, weights))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(P.combined_loss("ipo", None, inputs, beta=BETA), call("ipo", pairs))


def test_combined_loss_reference_free_needs_no_reference(pairs):
    pc, pr, _, _, lc, lr = pairs
    inputs = P.PairLogps(pc, pr, chosen_len_B=lc, rejected_len_B=lr)
    got = P.combined_loss(sorted(P.REFERENCE_FREE), None, inputs, beta=BETA, gamma=GAMMA)
    assert np.all(np.isfinite(got))
    with pytest.raises(ValueError, match=r"'sigmoid' needs \['ref_chosen_logps_B', 'ref_rejected_logps_B'\]"):
        P.combined_loss(["sigmoid"], None, inputs, beta=BETA)


@pytest.mark.parametrize("names, weights, hyper, message", [
    (["sigmoid", "dpo"], None, {"beta": BETA}, r"unknown preference loss 'dpo'; valid: \['apo_down', 'apo_zero'"),
    (["sigmoid", "ipo"], [1.0], {"beta": BETA}, "need one weight per loss, got 1 weights"),
    ([], [], {"beta": BETA}, "needs at least one loss"),
    (["sigmoid"], None, {"beta": BETA, "label_smothing": 0.1}, r"hyper-parameter\(s\) \['label_smothing'\]"),
    (["bco_pair"], None, {"beta": BETA}, r"'bco_pair' needs \['delta'\]"),
    (["hinge"], None, {}, r"'hinge' needs \['beta'\]"),
])
def test_combined_loss_rejects_bad_configuration(pairs, names, weights, hyper, message):
    with pytest.raises(ValueError, match=message):
        P.combined_loss(names, weights, P.PairLogps(*pairs), **hyper)


def test_robust_rejects_half_or_more_label_noise(pairs):
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        call("robust", pairs, label_smoothing=0.5)


def test_implicit_rewards(pairs):
    pc, _, rc, _ = pairs[:4]
    np.testing.assert_allclose(P.implicit_rewards(pc, rc, BETA), BETA * (pc.astype(np.float64) - rc), rtol=RTOL,
                               atol=ATOL)


# ----------------------------------------------------------------------------- log-probabilities

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk_size", [7, 16, 50, 128, 1000])  # V = 128: divides, does not, one chunk, > V
def test_chunked_token_logps_match_log_softmax(dtype, chunk_size):
    rng = np.random.default_rng(1)
    logits_BTV = jnp.asarray(rng.normal(0, 4, (3, 5, 128)), dtype)
    targets_BT = jnp.asarray(rng.integers(0, 128, (3, 5)))
    got = P.token_logps(logits_BTV, targets_BT, chunk_size)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, naive_token_logps(logits_BTV, targets_BT), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got, np_token_logps(np.asarray(logits_BTV.astype(jnp.float32)), np.asarray(targets_BT)),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [16, 50])
def test_chunked_token_logps_gradient_matches_log_softmax(chunk_size):
    rng = np.random.default_rng(2)
    logits_BTV = jnp.asarray(rng.normal(0, 4, (3, 5, 128)), jnp.float32)
    targets_BT, weights_BT = jnp.asarray(rng.integers(0, 128, (3, 5))), jnp.asarray(rng.normal(size=(3, 5)))
    grad = jax.grad(lambda x: jnp.sum(P.token_logps(x, targets_BT, chunk_size) * weights_BT))(logits_BTV)
    naive = jax.grad(lambda x: jnp.sum(naive_token_logps(x, targets_BT) * weights_BT))(logits_BTV)
    np.testing.assert_allclose(grad, naive, rtol=1e-5, atol=1e-5)
    bf16 = jax.grad(lambda x: jnp.sum(P.token_logps(x, targets_BT, chunk_size) * weights_BT))(
        logits_BTV.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16  # the gradient comes back in the logits' dtype, no float32 [B, T, V]
    np.testing.assert_allclose(bf16.astype(jnp.float32), naive, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("chunk_size", [16, 50])
def test_logps_from_hidden_match_full_projection(chunk_size):
    rng = np.random.default_rng(3)
    hidden_BTD, unembed_DV = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32), jnp.asarray(
        rng.normal(size=(16, 128)), jnp.float32)
    targets_BT, weights_BT = jnp.asarray(rng.integers(0, 128, (3, 5))), jnp.asarray(rng.normal(size=(3, 5)))
    naive = lambda h, w: jnp.sum(naive_token_logps(h @ w, targets_BT) * weights_BT)
    chunked = lambda h, w: jnp.sum(P.token_logps_from_hidden(h, w, targets_BT, chunk_size) * weights_BT)
    np.testing.assert_allclose(chunked(hidden_BTD, unembed_DV), naive(hidden_BTD, unembed_DV), rtol=1e-5)
    for got, want in zip(jax.grad(chunked, (0, 1))(hidden_BTD, unembed_DV),
                         jax.grad(naive, (0, 1))(hidden_BTD, unembed_DV)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    project = lambda h, offset, size: h @ jax.lax.dynamic_slice_in_dim(unembed_DV, offset, size, 1)
    np.testing.assert_allclose(P.token_logps_from_hidden(hidden_BTD, project, targets_BT, chunk_size, vocab_size=128),
                               naive_token_logps(hidden_BTD @ unembed_DV, targets_BT), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="vocab_size"):
        P.token_logps_from_hidden(hidden_BTD, project, targets_BT, chunk_size)


def _temp_bytes(fn, *shapes):
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_chunked_token_logps_never_hold_a_float32_copy_of_the_logits(dtype):
    B, T, V, D = 4, 128, 32768, 256
    full_f32 = B * T * V * 4  # 64 MiB
    logits, targets = jax.ShapeDtypeStruct((B, T, V), dtype), jax.ShapeDtypeStruct((B, T), jnp.int32)
    naive = _temp_bytes(naive_token_logps, logits, targets)
    chunked = _temp_bytes(lambda x, t: P.token_logps(x, t, 4096), logits, targets)
    chunked_grad = _temp_bytes(jax.grad(lambda x, t: jnp.sum(P.token_logps(x, t, 4096))), logits, targets)
    assert naive >= full_f32, naive  # the reference really materialises [B, T, V] in float32 ...
    assert chunked <= full_f32 // 3 and chunked_grad <= full_f32 // 3, (chunked, chunked_grad)  # ... this does not
    hidden, unembed = jax.ShapeDtypeStruct((B, T, D), dtype), jax.ShapeDtypeStruct((D, V), dtype)
    from_hidden = _temp_bytes(jax.grad(lambda h, w, t: jnp.sum(P.token_logps_from_hidden(h, w, t, 4096)), (0, 1)),
                              hidden, unembed, targets)
    assert from_hidden <= full_f32 // 2, from_hidden  # includes the [D, V] gradient accumulator


def test_sequence_logps_sums_completion_tokens_only():
    logps_BT = jnp.asarray([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -8.0, -1.0]])
    mask_BT = jnp.asarray([[0, 1, 1, 0], [1, 1, 1, 1]])
    total_B, count_B = P.sequence_logps(logps_BT, mask_BT)
    np.testing.assert_array_equal(total_B, [-5.0, -9.75])
    np.testing.assert_array_equal(count_B, [2.0, 4.0])


def _padded(logits_BTV, targets_BT, mask_BT, n_pad, side, rng):
    """Add `n_pad` padding positions (mask 0) with huge random logits and random targets on one side."""
    B, _, V = logits_BTV.shape
    pad = (rng.normal(0, 1e4, (B, n_pad, V)).astype(np.float32), rng.integers(-100, V, (B, n_pad)),
           np.zeros((B, n_pad), np.float32))
    join = (lambda real, p: np.concatenate([p, real], 1)) if side == "left" else (
        lambda real, p: np.concatenate([real, p], 1))
    return tuple(join(real, p) for real, p in zip((logits_BTV, targets_BT, mask_BT), pad))


def test_padding_changes_nothing():
    """Padding positions (mask 0, arbitrary logits and targets) change no log-prob and no count, bit for bit.

    Per-token log-probs depend only on their own position, so they are identical whatever the padding; the
    masked sum is bitwise identical when the row length (hence XLA's reduction tree) is unchanged, as here
    where padding overwrites masked positions. Adding columns changes the tree, so the float32 sum of the same
    values is reassociated: equal to rounding (measured on XLA:CPU: bitwise below 32 columns, a few ulps in
    about one long row in five).
    """
    rng = np.random.default_rng(4)
    B, T, V = 4, 40, 96
    logits = rng.normal(0, 3, (B, T, V)).astype(np.float32)
    targets, mask = rng.integers(0, V, (B, T)), (rng.random((B, T)) < 0.7).astype(np.float32)
    token_logps = jax.jit(P.token_logps, static_argnums=2)  # one compilation per row length
    logps = np.asarray(token_logps(jnp.asarray(logits), jnp.asarray(targets), 32))
    total, count = P.sequence_logps(logps, mask)

    garbage = np.where(mask[..., None] > 0, logits, rng.normal(0, 1e4, logits.shape).astype(np.float32))
    rewritten = np.asarray(token_logps(jnp.asarray(garbage), jnp.asarray(np.where(mask > 0, targets, -100)), 32))
    np.testing.assert_array_equal(rewritten[mask > 0], logps[mask > 0])
    for got, want in zip(P.sequence_logps(rewritten, mask), (total, count)):
        np.testing.assert_array_equal(got, want)

    for n_pad in (1, 24):
        for side in ("left", "right"):
            padded_logits, padded_targets, padded_mask = _padded(logits, targets, mask, n_pad, side, rng)
            padded = np.asarray(token_logps(jnp.asarray(padded_logits), jnp.asarray(padded_targets), 32))
            real = padded[:, n_pad:] if side == "left" else padded[:, :T]
            np.testing.assert_array_equal(real, logps)
            padded_total, padded_count = P.sequence_logps(padded, padded_mask)
            np.testing.assert_array_equal(padded_count, count)
            np.testing.assert_allclose(padded_total, total, rtol=1e-6)


def test_module_example_runs():
    import doctest

    assert doctest.testmod(P).failed == 0
