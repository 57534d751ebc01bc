"""`scan_layers`: decoder layers stored stacked and run as one `lax.scan` give the unrolled model's logits,
gradients and training curve, export the same weights, and resume across a switch of the setting."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from flax import nnx
from safetensors.numpy import load_file

from easytrain import ArgumentError, BaseTrainer
from easytrain.checkpoint import CheckpointManager
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from easytrain.generation import GenerationConfig, _generate, generate
from easytrain.lora import LoRAConfig, apply_lora
from easytrain.models import from_pretrained, init_model, save_pretrained
from easytrain.tasks import build_arithmetic_tokenizer
from easytrain.sharding import make_mesh
from easytrain.trainers import language_model
from easytrain.models import scan as scan_module
from easytrain.models.scan import ScanLayersError
from model_configs import VOCAB, family_config, right_padded_batch, tiny_config
from runs import StopAt, logged
from scan_models import arguments, lora_model, per_layer

CASES = {
    "llama": lambda: init_model(tiny_config()),
    "qwen3 (q/k norm, windows 5 | full)": lambda: init_model(family_config("qwen3")),
    "qwen2 (full, full, window 3)": lambda: init_model(family_config("qwen2", num_hidden_layers=3,
                                                                     max_window_layers=2)),
}


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


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory):
    """`losses(optimizer)`: the logged losses of one uninterrupted unrolled run with `optimizer`, trained once per
    optimizer for the module (both adamw layout switches compare with the same run)."""
    runs: dict[str, dict[int, float]] = {}

    def losses(optimizer: str) -> dict[int, float]:
        if optimizer not in runs:
            straight = arguments(tmp_path_factory.mktemp("straight"), optimizer=optimizer)
            BaseTrainer(straight).train()
            runs[optimizer] = logged(straight.output_dir)
        return runs[optimizer]

    return losses


@pytest.mark.parametrize("first, optimizer", [(False, "adamw"), (True, "adamw"), (True, "adafactor")],
                         ids=["layers then stacked", "stacked then layers", "adafactor, stacked then layers"])
def test_a_checkpoint_resumes_with_the_other_layout(tmp_path, first, optimizer, straight_losses):
    """Steps 1-2 in one layout, 3-4 in the other: parameters, optimizer moments and counts carry over exactly,
    so the losses are those of one uninterrupted run (Adafactor: its statistics per layer while stacked)."""
    BaseTrainer(arguments(tmp_path / "switched", scan_layers=first, optimizer=optimizer), callbacks=[StopAt(2)]).train()
    resumed = BaseTrainer(arguments(tmp_path / "switched", scan_layers=not first, resume_from_checkpoint="latest",
                                    optimizer=optimizer))
    resumed.train()
    assert resumed.model.scan_layers == (not first)
    losses = logged(tmp_path / "switched")
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(losses.values()), list(straight_losses(optimizer).values()), rtol=1e-5)
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
    build_arithmetic_tokenizer().save_pretrained(tmp_path)  # the run below reads the folder's tokenizer
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
