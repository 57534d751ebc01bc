"""`scan_layers`: the decoder layers as one `lax.scan` give the unrolled model's logits and gradients, and
train, save and resume with the same parameter paths."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.checkpoint import CheckpointManager
from easytrain.lora import LoRAConfig, apply_lora
from easytrain.models import init_model
from easytrain.models.scan import ScanLayersError
from model_configs import VOCAB, family_config, right_padded_batch, tiny_config
from runs import StopAt, logged

CASES = {
    "llama": lambda: init_model(tiny_config()),
    "qwen3 (q/k norm, windows 5 | full)": lambda: init_model(family_config("qwen3")),
    "qwen2 (full, full, window 3)": lambda: init_model(family_config("qwen2", num_hidden_layers=3,
                                                                     max_window_layers=2)),
}


def lora_model(dropout: float = 0.0) -> nnx.Module:
    """Adapters on every projection of every layer, `lora_b` random so that `lora_a` has gradients too."""
    model = apply_lora(init_model(tiny_config()), LoRAConfig(rank=4, dropout=dropout),
                       rngs=nnx.Rngs(params=1, dropout=2))
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.LoRAParam) and variable.shape[0] == 4:
            variable.set_value(jax.random.normal(jax.random.key(variable.shape[1]), variable.shape) * 0.1)
    return model


def value_and_grads(model: nnx.Module, scan: bool, remat: str = "none", trainable=nnx.Param):
    """A loss of the logits at every position (padding masked) and its gradient w.r.t. every trainable
    variable, plus the module's other variables after the call (the RNG counts dropout advances)."""
    model.scan_layers, model.remat = scan, remat
    ids, mask = (jnp.asarray(a) for a in right_padded_batch())
    weights = jax.random.normal(jax.random.key(0), (*ids.shape, VOCAB))
    graphdef, params, rest = nnx.split(model, trainable, ...)

    def loss(params):
        module = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))  # fresh variables: dropout advances
        logits = module(ids, attention_mask_BT=mask)
        return jnp.sum(logits * weights), (logits, nnx.state(module, nnx.Not(trainable)))

    (_, (logits, after)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads, after


def assert_same(scanned, unrolled) -> None:
    (logits, grads, after), (ref_logits, ref_grads, ref_after) = scanned, unrolled
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    flat, ref_flat = nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)
    assert [path for path, _ in flat] == [path for path, _ in ref_flat]
    for (path, grad), (_, ref_grad) in zip(flat, ref_flat):
        assert np.abs(ref_grad[...]).max() > 0, f"{path}: a zero gradient proves nothing"
        error = np.abs(grad[...] - ref_grad[...]).max() / np.abs(ref_grad[...]).max()
        assert error < 1e-5, f"{path}: gradients differ by {error:.2e} of their largest entry"
    for (path, value), (_, ref_value) in zip(nnx.to_flat_state(after), nnx.to_flat_state(ref_after)):
        np.testing.assert_array_equal(jax.random.key_data(value[...]) if path[-1] == "key" else value[...],
                                      jax.random.key_data(ref_value[...]) if path[-1] == "key" else ref_value[...])


@pytest.mark.parametrize("case", CASES)
def test_scan_gives_the_unrolled_logits_and_gradients(case):
    model = CASES[case]()
    assert_same(value_and_grads(model, scan=True), value_and_grads(model, scan=False))


def test_scan_under_full_remat():
    model = CASES["qwen3 (q/k norm, windows 5 | full)"]()
    assert_same(value_and_grads(model, scan=True, remat="full"), value_and_grads(model, scan=False))


def test_scan_with_lora_adapters_and_their_dropout():
    """Dropout draws each layer's own mask, and the advanced RNG counts are written back to every layer."""
    scanned = value_and_grads(lora_model(dropout=0.2), scan=True, trainable=nnx.LoRAParam)
    unrolled = value_and_grads(lora_model(dropout=0.2), scan=False, trainable=nnx.LoRAParam)
    counts = [value for path, value in nnx.to_flat_state(scanned[2]) if path[-1] == "count"]
    assert counts and all(int(count[...]) == 1 for count in counts)
    assert_same(scanned, unrolled)


def test_layers_built_differently_are_refused_naming_scan_layers():
    model = apply_lora(init_model(tiny_config(num_hidden_layers=3)),
                       LoRAConfig(rank=4, target_modules=r"model\.layers\.1\.mlp\.up_proj"))
    model.scan_layers = True
    with pytest.raises(ScanLayersError, match=r"scan_layers: layer 1 .*mlp/up_proj/lora_a"):
        nnx.eval_shape(lambda: model(jnp.zeros((1, 4), jnp.int32)))  # raised while tracing, before any compute


def test_decode_runs_unrolled_on_a_scan_model():
    model = CASES["qwen2 (full, full, window 3)"]()
    model.scan_layers = True
    ids, mask = (jnp.asarray(a) for a in right_padded_batch())
    logits, _ = model.decode(ids, model.init_cache(ids.shape[0], ids.shape[1]), attention_mask_BT=mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(model(ids, attention_mask_BT=mask))[real],
                               rtol=1e-5, atol=1e-5)


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    return TrainingArguments(**{**dict(
        output_dir=str(output_dir), max_length=32, train_batch_size=8, max_steps=4, logging_steps=1,
        eval_strategy="no", save_strategy="steps", save_steps=2, report_to=["jsonl"], disable_progress_bar=True,
        save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=8), **overrides})


def test_training_matches_and_resumes_with_the_same_checkpoint_layout(tmp_path):
    """Steps 1-2 unrolled, then resumed from that checkpoint with scan_layers and saved again at step 4."""
    unrolled = arguments(tmp_path / "unrolled")
    BaseTrainer(unrolled).train()
    switched = arguments(tmp_path / "switched")
    BaseTrainer(switched, callbacks=[StopAt(2)]).train()
    resumed = BaseTrainer(arguments(tmp_path / "switched", scan_layers=True, resume_from_checkpoint="latest"))
    resumed.train()
    assert resumed.model.scan_layers
    losses, unrolled_losses = logged(switched.output_dir), logged(unrolled.output_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(losses.values()), list(unrolled_losses.values()), rtol=1e-5)
    stored = [CheckpointManager(Path(args.output_dir) / "checkpoints").stored_signature(4)
              for args in (switched, unrolled)]
    assert stored[0] == stored[1] and "params.layers.1.self_attn.q_proj.kernel" in stored[0]


def test_a_module_without_the_attribute_is_refused(tmp_path):
    trainer = BaseTrainer(arguments(tmp_path, scan_layers=True))
    with pytest.raises(ArgumentError, match="scan_layers: Linear has no `scan_layers` attribute"):
        trainer.adapt_module(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_scan_with_structured_attention_masks():
    """`dot_product_attention` hands the scan body a structured mask: one window for every layer works; mixed
    windows (a static window per layer) are refused with both settings named."""
    model = CASES["llama"]()
    model.attention_implementation = "dot_product_attention"
    assert_same(value_and_grads(model, scan=True), value_and_grads(model, scan=False))
    mixed = CASES["qwen2 (full, full, window 3)"]()
    mixed.attention_implementation = "dot_product_attention"
    with pytest.raises(ValueError, match="scan_layers with attention_implementation 'dot_product_attention'"):
        value_and_grads(mixed, scan=True)
