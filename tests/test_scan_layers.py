"""`scan_layers`: decoder layers stored stacked and run as one `lax.scan` give the unrolled model's logits,
gradients and training curve, export the same weights, and resume across a switch of the setting."""

import gc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from flax import nnx, traverse_util
from safetensors.numpy import load_file

from easytrain import ArgumentError, BaseTrainer, TrainingArguments, placement
from easytrain.checkpoint import CheckpointManager
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from easytrain.generation import GenerationConfig, _generate, generate
from easytrain.lora import LoRAConfig, apply_lora, merge_lora
from easytrain.models import from_pretrained, init_model, save_pretrained
from easytrain.sharding import make_mesh
from easytrain.tasks import build_arithmetic_tokenizer
from easytrain.trainers import language_model
from easytrain.models import llama as llama_module, scan as scan_module
from easytrain.models.scan import ScanLayersError, unstack_layer_dicts
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


def per_layer(state: nnx.State | dict) -> dict:
    """Flat `path -> array` in the per-layer layout, whichever way the layers were stored."""
    tree = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    flat = traverse_util.flatten_dict(unstack_layer_dicts(tree))
    return {path: jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v
            for path, v in flat.items()}


def assert_same(scanned, unrolled) -> None:
    (logits, grads, after), (ref_logits, ref_grads, ref_after) = scanned, unrolled
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    flat, ref_flat = per_layer(grads), per_layer(ref_grads)
    assert list(flat) == list(ref_flat)
    for path, ref_grad in ref_flat.items():
        assert np.abs(ref_grad).max() > 0, f"{path}: a zero gradient proves nothing"
        error = np.abs(flat[path] - ref_grad).max() / np.abs(ref_grad).max()
        # float32 sums run in another order in the scan: up to 1.04e-5 of the largest entry (a LoRA gradient,
        # jax 0.11); a wrong layer, mask or dropout draw differs by whole entries
        assert error < 3e-5, f"{path}: gradients differ by {error:.2e} of their largest entry"
    after, ref_after = per_layer(after), per_layer(ref_after)
    assert list(after) == list(ref_after)
    for path, ref_value in ref_after.items():
        np.testing.assert_array_equal(after[path], ref_value)


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
    counts = [value for path, value in per_layer(scanned[2]).items() if path[-1] == "count"]
    assert counts and all(int(count) == 1 for count in counts)
    assert_same(scanned, unrolled)


@pytest.mark.parametrize("config", [tiny_config(), family_config("qwen3")], ids=["llama", "qwen3 (q/k norm)"])
def test_layers_built_stacked_hold_the_weights_built_one_by_one(config):
    """`init_model(scan_layers=True)` builds the layers stacked in one vmapped build: the same weights, layer by
    layer, and the same logical axes behind an unsplit layer axis, as the list built one layer at a time."""
    unrolled_model, stacked_model = init_model(config), init_model(config, scan_layers=True)
    assert stacked_model.scan_layers and not unrolled_model.scan_layers
    unrolled, stacked = per_layer(nnx.state(unrolled_model)), per_layer(nnx.state(stacked_model))
    assert sorted(stacked) == sorted(unrolled)
    for path, value in unrolled.items():
        np.testing.assert_array_equal(stacked[path], value, err_msg="/".join(map(str, path)))
    kernels = [unrolled[("layers", index, "mlp", "up_proj", "kernel")] for index in range(2)]
    assert not np.array_equal(*kernels)  # each layer draws its own weights, so the comparison can fail
    axes = unrolled_model.layers[0].mlp.up_proj.kernel.get_metadata()["out_sharding"]
    assert stacked_model.layers.stacked.mlp.up_proj.kernel.get_metadata()["out_sharding"] == (None, *axes)


def test_a_stacked_build_is_one_program_whatever_the_depth():
    """What keeps a deep model's initialisation from compiling for minutes: the stacked build traces one layer,
    so its program does not grow with depth; built one layer at a time, every layer adds its own draws."""
    def program_lines(depth: int, scan: bool) -> int:
        config = tiny_config(num_hidden_layers=depth)
        return jax.jit(lambda: nnx.state(init_model(config, scan_layers=scan))).lower().as_text().count("\n")

    assert program_lines(2, scan=True) == program_lines(6, scan=True)
    assert program_lines(6, scan=False) > program_lines(2, scan=False) + 100


def _init_fusions(config) -> int:
    return jax.jit(lambda: nnx.state(init_model(config))).lower().compile().as_text().count(" fusion(")


def test_layers_own_streams_compile_to_no_more_than_one_shared_stream(monkeypatch):
    """Each layer's streams keep the parent's keys (counted from an offset), which XLA folds as constants: the
    one-by-one build compiles to no more fusions than layers drawing from one stream in turn. One key per layer
    (`jax.random.split`) made XLA derive every weight's key at run time, 15 more fusions per layer."""
    config = tiny_config(num_hidden_layers=3)
    own_streams = _init_fusions(config)
    monkeypatch.setattr(scan_module, "layer_rngs", lambda rngs, index: rngs)  # all layers draw from one stream
    assert own_streams <= _init_fusions(config)


def test_more_layers_than_streams_are_refused():
    with pytest.raises(ValueError, match="build_layers: 4096 layers; at most 4095"):
        scan_module.build_layers(lambda rngs: nnx.Linear(2, 2, rngs=rngs), 4096, nnx.Rngs(0), stacked=False)


def test_layers_built_differently_are_refused_naming_scan_layers():
    model = apply_lora(init_model(tiny_config(num_hidden_layers=3)),
                       LoRAConfig(rank=4, target_modules=r"model\.layers\.1\.mlp\.up_proj"))
    with pytest.raises(ScanLayersError, match=r"scan_layers: layer 1 .*mlp/up_proj/lora_a"):
        model.scan_layers = True  # raised when the layers would be stacked, before any compute
    assert not model.scan_layers and len(model.layers) == 3


def test_decode_on_a_scan_model_gives_the_forward_logits():
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


def test_training_matches_unrolled_and_resumes_from_stacked_checkpoints(tmp_path):
    """Steps 1-2 with scan_layers, resumed to step 4: the unrolled run's losses (with a weight decay strong enough
    to show if the stacked norm scales were decayed), checkpoints that hold the stacked layout, and the same
    Hugging Face export."""
    overrides = dict(weight_decay=30.0, save_pretrained_at_end=True)
    unrolled = arguments(tmp_path / "unrolled", **overrides)
    BaseTrainer(unrolled).train()
    scanned = arguments(tmp_path / "scanned", scan_layers=True, **overrides)
    BaseTrainer(scanned, callbacks=[StopAt(2)]).train()
    resumed = BaseTrainer(arguments(tmp_path / "scanned", scan_layers=True, resume_from_checkpoint="latest",
                                    **overrides))
    resumed.train()
    assert resumed.model.scan_layers
    losses, unrolled_losses = logged(scanned.output_dir), logged(unrolled.output_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(losses.values()), list(unrolled_losses.values()), rtol=1e-5)
    stored = CheckpointManager(Path(scanned.output_dir) / "checkpoints").stored_signature(4)
    assert "params.layers.stacked.self_attn.q_proj.kernel" in stored
    assert not any(key.startswith("params.layers.0.") for key in stored)
    exported = [load_file(Path(a.output_dir) / "final_model" / "model.safetensors") for a in (scanned, unrolled)]
    assert sorted(exported[0]) == sorted(exported[1]) and "model.layers.1.self_attn.q_proj.weight" in exported[0]
    for name, tensor in exported[1].items():  # Adam turns float32 rounding of tiny gradients into lr-sized steps
        np.testing.assert_allclose(exported[0][name], tensor, rtol=1e-3, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("first, optimizer", [(False, "adamw"), (True, "adamw"), (True, "adafactor")],
                         ids=["layers then stacked", "stacked then layers", "adafactor, stacked then layers"])
def test_a_checkpoint_resumes_with_the_other_layout(tmp_path, first, optimizer):
    """Steps 1-2 in one layout, 3-4 in the other: parameters, optimizer moments and counts carry over exactly,
    so the losses are those of one uninterrupted run (Adafactor: its statistics per layer while stacked)."""
    straight = arguments(tmp_path / "straight", optimizer=optimizer)
    BaseTrainer(straight).train()
    BaseTrainer(arguments(tmp_path / "switched", scan_layers=first, optimizer=optimizer), callbacks=[StopAt(2)]).train()
    resumed = BaseTrainer(arguments(tmp_path / "switched", scan_layers=not first, resume_from_checkpoint="latest",
                                    optimizer=optimizer))
    resumed.train()
    assert resumed.model.scan_layers == (not first)
    losses = logged(tmp_path / "switched")
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(losses.values()), list(logged(straight.output_dir).values()), rtol=1e-5)
    stored = CheckpointManager(tmp_path / "switched" / "checkpoints").stored_signature(4)
    assert ("params.layers.stacked.mlp.up_proj.kernel" in stored) == (not first)


def test_a_checkpoint_loads_straight_into_stacked_layers(tmp_path, monkeypatch):
    """`from_pretrained(scan_layers=True)` stacks each weight as its layers are read (here from several files):
    the values of loading per layer and then stacking, each stacked weight split like its layer's; a run from
    `model_name_or_path` with scan_layers starts from them."""
    config = family_config("qwen3")  # q/k norms: stacked 1-D weights too
    save_pretrained(tmp_path, nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config,
                    max_shard_size=50_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 3
    mesh = make_mesh()
    stacked = from_pretrained(tmp_path, mesh=mesh, scan_layers=True)
    reference = from_pretrained(tmp_path, mesh=mesh)
    layer_spec = reference.layers[0].mlp.up_proj.kernel[...].sharding.spec
    reference.scan_layers = True
    assert stacked.scan_layers
    assert stacked.layers.stacked.mlp.up_proj.kernel[...].sharding.spec == P(None, *layer_spec)
    got, want = per_layer(nnx.state(stacked)), per_layer(nnx.state(reference))
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(map(str, path)))
    loads = []
    monkeypatch.setattr(language_model, "from_pretrained", lambda *a, **k: loads.append(k) or from_pretrained(*a, **k))
    trainer = BaseTrainer(arguments(tmp_path / "run", model_name_or_path=str(tmp_path), scan_layers=True))
    kernels = per_layer(trainer.state.params)
    assert [load["scan_layers"] for load in loads] == [True]
    for path, value in want.items():
        if path[-1] == "kernel":
            np.testing.assert_array_equal(kernels[path], value, err_msg="/".join(map(str, path)))


def test_a_scan_run_starts_from_exported_weights(tmp_path):
    """init_weights_from an export (per-layer Hugging Face tensors) into a run whose layers are stacked."""
    source = arguments(tmp_path / "source", max_steps=2, save_pretrained_at_end=True, save_strategy="no")
    BaseTrainer(source).train()
    export = Path(source.output_dir) / "final_model"
    runs = {scan: BaseTrainer(arguments(tmp_path / f"scan-{scan}", scan_layers=scan, max_steps=2,
                                        init_weights_from=str(export))) for scan in (False, True)}
    for trainer in runs.values():
        trainer.setup()
    exported = load_file(export / "model.safetensors")
    stacked = np.asarray(runs[True].state.params["layers"]["stacked"]["mlp"]["up_proj"]["kernel"])
    for index in range(stacked.shape[0]):
        np.testing.assert_array_equal(stacked[index], exported[f"model.layers.{index}.mlp.up_proj.weight"].T)
    scanned, unrolled = (per_layer(runs[scan].state.params) for scan in (True, False))
    assert scanned.keys() == unrolled.keys()
    for path, value in unrolled.items():
        np.testing.assert_array_equal(scanned[path], value, err_msg=str(path))


@pytest.mark.parametrize("source_scan", [False, True], ids=["from layers", "from stacked layers"])
def test_a_run_starts_from_a_checkpoint_of_the_other_layout(tmp_path, source_scan):
    source = BaseTrainer(arguments(tmp_path / "source", scan_layers=source_scan, max_steps=2, save_steps=2))
    source.train()
    run = BaseTrainer(arguments(tmp_path / "run", scan_layers=not source_scan, max_steps=2,
                                init_weights_from=str(tmp_path / "source")))
    run.setup()
    assert run.model.scan_layers == (not source_scan)
    ours, theirs = per_layer(run.state.params), per_layer(source.state.params)
    assert ours.keys() == theirs.keys()
    for path, value in theirs.items():
        np.testing.assert_array_equal(ours[path], value, err_msg=str(path))


@pytest.mark.parametrize("sync", [False, True], ids=["fixed reference", "TR-DPO reference"])
def test_dpo_with_its_frozen_reference_trains_the_same_with_stacked_layers(tmp_path, sync):
    """The reference policy, a frozen copy of the module, is stacked like the policy, so TR-DPO can mix them."""
    for scan in (False, True):
        trainer = DPOTrainer(arguments(tmp_path / f"scan-{scan}", scan_layers=scan, max_steps=3, save_strategy="no",
                                       max_train_samples=48),
                             DPOArguments(sync_ref_model=sync, ref_model_sync_steps=1))
        trainer.train()
        assert ("stacked" in trainer.state.frozen["reference"]["layers"]) == scan
    np.testing.assert_allclose(list(logged(tmp_path / "scan-True").values()),
                               list(logged(tmp_path / "scan-False").values()), rtol=1e-5)


@pytest.mark.parametrize("build", [CASES["qwen3 (q/k norm, windows 5 | full)"], lambda: lora_model(dropout=0.2)],
                         ids=["qwen3 windows", "lora adapters"])
def test_generation_on_a_scan_model_matches_unrolled(build):
    model = build()
    ids, mask = (jnp.asarray(a) for a in right_padded_batch())
    unrolled = generate(model, ids, mask, max_new_tokens=6, do_sample=True, seed=3)
    model.scan_layers = True
    np.testing.assert_array_equal(generate(model, ids, mask, max_new_tokens=6, do_sample=True, seed=3), unrolled)


def generate_scratch_bytes(model: nnx.Module) -> int:
    """Scratch memory of the compiled generation loop (prefill, then 8 tokens) for two 12-token prompts."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, mask = (jnp.asarray(a) for a in right_padded_batch())
    lowered = _generate.lower(graphdef, params, rest, ids, mask, jax.random.key(0),
                              config=GenerationConfig(max_new_tokens=8))
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_generation_on_a_scan_model_holds_no_second_copy_of_the_layer_weights():
    """Decoding scans the stacked layers with their cache stacked too: the loop holds the slice of the one
    layer it runs (XLA:CPU copies it out for the matmuls), never a per-layer copy of all 8 (7.9 MB here)."""
    model = init_model(tiny_config(hidden_size=128, intermediate_size=512, num_hidden_layers=8))
    unrolled = generate_scratch_bytes(model)
    model.scan_layers = True
    one_layer = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model.layers, nnx.Param))) / 8
    assert generate_scratch_bytes(model) < unrolled + 1.5 * one_layer, (unrolled, one_layer)


def test_a_cache_made_for_the_other_layout_is_refused_naming_init_cache():
    model = init_model(tiny_config())
    ids = jnp.asarray(right_padded_batch()[0])
    cache = model.init_cache(ids.shape[0], ids.shape[1])  # one array per layer
    model.scan_layers = True
    with pytest.raises(ValueError, match=r"scan_layers=False .* scan_layers=True.*init_cache\(\)"):
        model.decode(ids, cache)
    assert model.init_cache(ids.shape[0], ids.shape[1]).keys.shape[0] == 2  # [L, B, S, N, K]


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


def live_bytes() -> int:
    """Bytes of the device buffers alive now, each counted once (arrays placed with aliasing share one)."""
    gc.collect()
    buffers = {(shard.device.id, shard.data.unsafe_buffer_pointer()): shard.data.nbytes
               for array in jax.live_arrays() for shard in array.addressable_shards}
    return sum(buffers.values())


def bytes_after_each_call(monkeypatch, owner, name: str) -> list[int]:
    """`live_bytes()` after each call of `owner.<name>`, until `monkeypatch.undo()`."""
    held, original = [], getattr(owner, name)

    def watched(*args, **kwargs):
        out = original(*args, **kwargs)
        held.append(live_bytes())
        return out

    monkeypatch.setattr(owner, name, watched)
    return held


@pytest.mark.parametrize("direction", ["stack", "unstack"])
def test_switching_the_layout_holds_at_most_one_stacked_weight_more_than_the_model(monkeypatch, direction):
    """Setting `scan_layers` moves the weights one variable at a time and lets go of what it moved: the
    devices never hold a second copy of every layer (what made a LoRA run under scan_layers, which stacks
    the loaded layers after adding its adapters, peak at twice its base weights)."""
    model = init_model(tiny_config(hidden_size=128, intermediate_size=512, num_hidden_layers=8))
    want = {path: np.array(value) for path, value in per_layer(nnx.state(model)).items()}  # copies: no hold
    model.scan_layers = direction == "unstack"
    largest = max(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model.layers))) * (8 if direction == "stack" else 1)
    before = live_bytes()
    held = bytes_after_each_call(monkeypatch, *((jnp, "stack") if direction == "stack" else (nnx, "merge")))
    model.scan_layers = direction == "stack"
    monkeypatch.undo()
    assert held and max(held) - before <= largest, (max(held) - before, largest)
    got = per_layer(nnx.state(model))
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(map(str, path)))


def test_a_lora_run_under_scan_layers_stacks_its_loaded_base_without_a_second_copy(tmp_path, monkeypatch):
    """A LoRA run from `model_name_or_path` loads per layer, adds its adapters, then stacks: at every stack the
    devices hold the base and adapters plus at most one stacked weight, never the base twice."""
    config = tiny_config(hidden_size=128, intermediate_size=512, num_hidden_layers=8)
    save_pretrained(tmp_path / "base", nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config)
    build_arithmetic_tokenizer().save_pretrained(tmp_path / "base")
    before = live_bytes()
    held = bytes_after_each_call(monkeypatch, jnp, "stack")
    state = BaseTrainer(arguments(tmp_path / "run", model_name_or_path=str(tmp_path / "base"), scan_layers=True,
                                    lora_rank=4, max_steps=1)).state  # built here: loaded, adapted, stacked
    monkeypatch.undo()
    model_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves((state.base, state.params)))
    largest = max(leaf.nbytes for leaf in jax.tree.leaves(state.base))
    assert held and max(held) - before <= model_bytes + largest, (max(held) - before, model_bytes, largest)


def test_switching_a_module_merged_from_the_same_state_leaves_the_other_untouched():
    """Modules merged from one state share their variable objects: a layout switch that lets go of what it moved
    must not take the values from the other (`merge_lora` unstacks such a copy of a model that keeps training)."""
    model = lora_model()
    model.scan_layers = True
    ids = jnp.asarray(right_padded_batch()[0])
    want = model(ids)
    twin = nnx.merge(*nnx.split(model))
    twin.scan_layers = False
    np.testing.assert_array_equal(model(ids), want)
    np.testing.assert_allclose(merge_lora(model)(ids), want, atol=1e-5)
    np.testing.assert_array_equal(model(ids), want)


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "stacked layers"])
def test_a_fresh_run_builds_its_layers_stacked_and_then_takes_its_layout(tmp_path, monkeypatch, scan):
    """A fresh run's model is built with its layers stacked (one vmapped layer: an initialisation program that
    does not grow with depth) and switched to the run's layout outside that program: the weights a seed gives
    built one by one, in either layout."""
    builds, initialising, real_build, real_init = [], [], llama_module.build_layers, placement.initialise_module
    monkeypatch.setattr(llama_module, "build_layers", lambda *a, stacked, **k: (
        initialising and builds.append(stacked)) or real_build(*a, stacked=stacked, **k))
    monkeypatch.setattr(placement, "initialise_module", lambda *a, **k: (
        initialising.append(1), real_init(*a, **k), initialising.clear())[1])
    trainer = BaseTrainer(arguments(tmp_path, max_steps=1, seed=3, scan_layers=scan))
    state = trainer.state
    assert builds and all(builds)  # the initialisation program's builds (a check on shapes may come before)
    assert any(scan_module.is_stacked_path(path) for path in traverse_util.flatten_dict(state.params)) == scan
    built_one_by_one = jax.jit(lambda: nnx.to_pure_dict(nnx.state(init_model(trainer.model_config, seed=3),
                                                                   nnx.Param)))  # compiled, as the trainer's
    want = per_layer(built_one_by_one())
    got = per_layer(state.params)
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(map(str, path)))


def test_a_fresh_run_refuses_what_adapt_module_refuses_before_it_draws_a_weight(tmp_path, monkeypatch):
    """The switches and adapters are checked on shapes before the initialisation program runs: a LoRA target
    that matches nothing is refused, naming its argument, with no weight drawn."""
    runs, real = [], placement.initialise_module
    monkeypatch.setattr(placement, "initialise_module", lambda *a, **k: runs.append(1) or real(*a, **k))
    trainer = BaseTrainer(arguments(tmp_path, lora_rank=4, lora_target_modules=["no_such_module"]))
    with pytest.raises(ArgumentError, match="lora_target_modules"):
        trainer.setup()
    assert not runs
