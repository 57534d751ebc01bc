"""DPO's summed completion log-probs, whichever way they are computed (vocabulary chunks of the full logits,
`logps_chunk_size`; the head a few tokens at a time, `loss_chunk_size`), equal a float64 NumPy log-softmax of the
model's logits on pairs padded to different lengths (an eval padding pair among them), and have the gradients of a
plain `jax.nn.log_softmax`, in float32 and under bfloat16 compute."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain.models import init_model
from easytrain.trainers.dpo import DPOTrainer
from model_configs import VOCAB, tiny_config

#: (prompt, chosen, rejected) lengths per pair; the last pair is an eval padding row (nothing supervised).
PAIRS = [(3, 5, 2), (6, 1, 8), (2, 9, 4), (0, 0, 0)]
LENGTH = 16


def pair_batch(seed: int = 0) -> dict[str, jax.Array]:
    """`[B, 2, T]` rows as `PairedCollate` lays them out: prompt then completion, right-padded; the loss mask
    covers the completion's targets only."""
    rng = np.random.RandomState(seed)
    shape = (len(PAIRS), 2, LENGTH)
    ids, real, supervised = rng.randint(0, VOCAB, shape), np.zeros(shape, np.int32), np.zeros(shape, np.float32)
    for b, (prompt, *completions) in enumerate(PAIRS):
        for side, completion in enumerate(completions):
            real[b, side, :prompt + completion] = 1
            supervised[b, side, max(prompt - 1, 0):prompt + completion - 1] = 1 if completion else 0
    ids = ids * real  # padding is id 0
    targets = np.concatenate([ids[..., 1:], np.zeros((*shape[:2], 1), ids.dtype)], axis=-1)
    return {k: jnp.asarray(v) for k, v in dict(input_ids=ids, targets=targets, loss_mask=supervised,
                                               attention_mask=real).items()}


def pair_logps(model: nnx.Module, batch, *, loss_chunk_size: int = 0, logps_chunk_size: int = 4096):
    """`DPOTrainer.pair_logps` with these settings: `[B, 2]` sums, lengths and summed mean logits."""
    settings = SimpleNamespace(arguments=SimpleNamespace(loss_chunk_size=loss_chunk_size),
                               dpo=SimpleNamespace(logps_chunk_size=logps_chunk_size))
    return DPOTrainer.pair_logps(settings, model, batch)


def numpy_reference(logits_NTV: np.ndarray, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums of float64 log-softmax target entries over the loss mask, the mask's counts, summed mean logits."""
    logits = np.asarray(logits_NTV, np.float64)
    top = logits.max(-1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets, mask = np.asarray(batch["targets"]).reshape(-1, LENGTH), np.asarray(batch["loss_mask"]).reshape(-1, LENGTH)
    picked = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    shape = batch["input_ids"].shape[:2]
    return ((picked * mask).sum(-1).reshape(shape), mask.sum(-1).reshape(shape),
            (logits.mean(-1) * mask).sum(-1).reshape(shape))


def plain_log_softmax_sums(model: nnx.Module, batch) -> tuple[jax.Array, jax.Array]:
    """The same sums by `jax.nn.log_softmax` of the whole float32 logits (plain autodiff, no custom rule), and
    those logits."""
    ids_NT = batch["input_ids"].reshape(-1, LENGTH)
    logits = model(ids_NT, attention_mask_BT=batch["attention_mask"].reshape(-1, LENGTH))
    logps = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"].reshape(-1, LENGTH, 1), -1)[..., 0]
    return jnp.sum(logps * batch["loss_mask"].reshape(-1, LENGTH), -1).reshape(batch["input_ids"].shape[:2]), logits


SETTINGS = {"vocabulary chunks of 7 (a short last one)": dict(logps_chunk_size=7),
            "the head over 5 tokens at a time": dict(loss_chunk_size=5)}
#: Weights of a DPO-like mix of both sides' sums (the padding pair's too: its sums must stay 0 with no gradient).
WEIGHTS = jnp.asarray([[1.0, -0.5], [0.3, 2.0], [-1.0, 0.7], [5.0, 5.0]])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16 compute"])
def test_pair_log_probs_equal_a_float64_log_softmax_with_plain_gradients(dtype):
    model, batch = init_model(tiny_config(), seed=3, dtype=dtype), pair_batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads(pair_sums):
        def weighted(p):
            out = pair_sums(nnx.merge(graphdef, p, rest))
            return jnp.sum(WEIGHTS * out[0]), out
        return jax.jit(jax.grad(weighted, has_aux=True))(params)

    want_grads, (_, logits_NTV) = grads(lambda m: plain_log_softmax_sums(m, batch))
    want_sums, want_lengths, want_mean_logits = numpy_reference(logits_NTV, batch)
    assert want_sums[-1].tolist() == [0, 0] and np.all(want_sums[:-1] < -1)  # padding pair: 0; others: real sums
    for name, settings in SETTINGS.items():
        got_grads, (sums, lengths, mean_logits) = grads(lambda m: pair_logps(m, batch, **settings))
        np.testing.assert_array_equal(lengths, want_lengths)
        np.testing.assert_allclose(sums, want_sums, rtol=1e-6, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(mean_logits, want_mean_logits, rtol=1e-5, atol=1e-6, err_msg=name)
        for (path, got), want in zip(jax.tree.leaves_with_path(got_grads), jax.tree.leaves(want_grads), strict=True):
            scale = float(np.abs(want).max())
            assert scale > 0, f"{jax.tree_util.keystr(path)}: a zero gradient proves nothing"
            error = float(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max()) / scale
            # float32: sums in another order, under 1e-6 of the largest entry. bfloat16: the head's weight gradient
            # is rounded to bfloat16 once per chunk of 5 tokens rather than once, one bfloat16 step (4e-3) apart.
            assert error < (1e-5 if dtype == jnp.float32 else 1e-2), f"{name}: {jax.tree_util.keystr(path)} {error:.1e}"
