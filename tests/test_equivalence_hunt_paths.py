"""Options that must change only speed or memory, combined as a user runs them: `scan_layers` with LoRA and a
remat policy, the chunked loss, attention implementations and query blocks, on packed rows with padding and a
sliding window. Each combination gives the plain path's loss and gradients, and packed documents the logits they
have run alone (an independent reference: no packing inputs at all)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain.losses import causal_lm_loss
from easytrain.lora import LoRAConfig, apply_lora
from easytrain.models import init_model, masks
from model_configs import VOCAB, family_config
from scan_models import per_layer

#: Row 0: documents of 7, 6 and 2 tokens then one padding token; row 1: 16 tokens of one document. Longer than
#: the 4-token window, so the window cuts into every long document.
SEGMENTS_BT = np.array([[1] * 7 + [2] * 6 + [3] * 2 + [0], [1] * 16])


def packed_batch(seed: int = 0) -> dict[str, jax.Array]:
    """A packed batch as the collate lays it out: ids, targets, loss mask, padding mask, segments, positions."""
    rng = np.random.RandomState(seed)
    starts_BT = np.concatenate([np.ones((2, 1), bool), SEGMENTS_BT[:, 1:] != SEGMENTS_BT[:, :-1]], axis=1)
    index_T = np.arange(SEGMENTS_BT.shape[1])
    positions_BT = index_T - np.maximum.accumulate(np.where(starts_BT, index_T, 0), axis=1)
    real_BT = (SEGMENTS_BT > 0).astype(np.int32)
    loss_mask_BT = real_BT * (rng.rand(*SEGMENTS_BT.shape) < 0.7)
    return {k: jnp.asarray(v) for k, v in dict(
        input_ids=rng.randint(0, VOCAB, SEGMENTS_BT.shape), targets=rng.randint(0, VOCAB, SEGMENTS_BT.shape),
        loss_mask=loss_mask_BT, attention_mask=real_BT, segment_ids=SEGMENTS_BT, positions=positions_BT).items()}


def lora_mistral() -> nnx.Module:
    """Mistral (one 4-token window for every layer) with adapters on every projection and the head, `lora_b`
    random so that every adapter weight has a gradient."""
    model = apply_lora(init_model(family_config("mistral")),
                       LoRAConfig(rank=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj", "lm_head"]), rngs=1)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "lora_b"):
            module.lora_b.set_value(jax.random.normal(jax.random.key(module.lora_b.shape[1]),
                                                      module.lora_b.shape) * 0.1)
    return model


def loss_and_grads(model: nnx.Module, *, scan: bool = False, remat: str = "none", chunk: int = 0,
                   implementation: str = "xla", trainable=nnx.LoRAParam):
    """The packed batch's summed loss, its token count, and the gradients of the trainable variables in the
    per-layer layout, with the options set on `model` (restored after)."""
    model.scan_layers, model.remat, model.attention_implementation = scan, remat, implementation
    try:
        graphdef, params, rest = nnx.split(model, trainable, ...)

        def loss(p):
            module = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))  # variables of this trace
            out = causal_lm_loss(module, packed_batch(), None, True, chunk_size=chunk)
            return out.loss_sum, out.count

        (loss_sum, count), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return float(loss_sum), float(count), per_layer(grads)
    finally:
        model.scan_layers, model.remat, model.attention_implementation = False, "none", "xla"


def assert_same_training(got, want) -> None:
    (loss, count, grads), (want_loss, want_count, want_grads) = got, want
    assert count == want_count
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert list(grads) == list(want_grads)
    for path, want_grad in want_grads.items():
        scale = float(np.abs(want_grad).max())
        assert scale > 0, f"{path}: a zero gradient proves nothing"
        error = float(np.abs(grads[path] - want_grad).max()) / scale
        # float32 sums in another order: about 1e-6 of the largest entry; a wrong mask, window or layer is whole
        assert error < 3e-5, f"{path}: gradients differ by {error:.2e} of their largest entry"


COMBINATIONS = {
    "scan + full remat + chunked": dict(scan=True, remat="full", chunk=5),
    "scan + dots remat + chunked + dot_product_attention": dict(scan=True, remat="dots", chunk=7,
                                                                implementation="dot_product_attention"),
}


@pytest.fixture(scope="module")
def model_and_plain():
    model = lora_mistral()
    return model, loss_and_grads(model)


@pytest.mark.parametrize("options", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_lora_on_packed_windowed_rows_trains_the_same_whatever_the_options(model_and_plain, options):
    model, plain = model_and_plain
    assert_same_training(loss_and_grads(model, **options), plain)


def test_query_blocks_on_packed_windowed_rows_train_the_same(model_and_plain, monkeypatch):
    """The "xla" path's query blocks (from `BLOCKED_FROM` tokens; 16 here) under scan and remat."""
    model, plain = model_and_plain
    monkeypatch.setattr(masks, "BLOCKED_FROM", 16)
    monkeypatch.setattr(masks, "QUERY_BLOCKS", 4)
    assert_same_training(loss_and_grads(model, scan=True, remat="full", chunk=5), plain)


def documents(batch: dict[str, jax.Array]) -> list[tuple[int, np.ndarray]]:
    """(row, columns) of every packed document."""
    segments_BT = np.asarray(batch["segment_ids"])
    return [(row, np.flatnonzero(segments_BT[row] == segment)) for row in range(len(segments_BT))
            for segment in np.unique(segments_BT[row]) if segment > 0]


def logits_alone(model: nnx.Module, batch: dict[str, jax.Array]) -> list[np.ndarray]:
    """Each packed document's logits from a row of its own: no padding, segment or position inputs."""
    ids_BT = np.asarray(batch["input_ids"])
    return [np.asarray(jax.jit(lambda ids: model(ids))(jnp.asarray(ids_BT[row, cols][None]))[0])
            for row, cols in documents(batch)]


@pytest.fixture(scope="module")
def alone(model_and_plain) -> list[np.ndarray]:
    return logits_alone(model_and_plain[0], packed_batch())


@pytest.mark.parametrize("implementation, scan, blocked", [
    ("xla", False, False), ("xla", True, True), ("dot_product_attention", True, False)])
def test_packed_windowed_documents_get_their_logits_run_alone(model_and_plain, alone, monkeypatch, implementation,
                                                              scan, blocked):
    model, _ = model_and_plain
    batch = packed_batch()
    if blocked:
        monkeypatch.setattr(masks, "BLOCKED_FROM", 16)
    model.scan_layers, model.attention_implementation = scan, implementation
    try:
        logits_BTV = np.asarray(jax.jit(lambda b: model(
            b["input_ids"], attention_mask_BT=b["attention_mask"], segment_ids_BT=b["segment_ids"],
            positions_BT=b["positions"]))(batch))
    finally:
        model.scan_layers, model.attention_implementation = False, "xla"
    for (row, cols), expected in zip(documents(batch), alone, strict=True):
        np.testing.assert_allclose(logits_BTV[row, cols], expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"row {row}, columns {cols}")
