"""`scan_layers` switches of layout move the weights one variable at a time, never holding a second copy of every
layer, and a fresh run builds its layers stacked before it takes its layout."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from easytrain import ArgumentError, BaseTrainer, placement
from easytrain.lora import merge_lora
from easytrain.models import init_model, save_pretrained
from easytrain.models import llama as llama_module, scan as scan_module
from easytrain.tasks import build_arithmetic_tokenizer
from model_configs import right_padded_batch, tiny_config
from scan_models import arguments, lora_model, per_layer


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
def test_switching_the_layout_holds_at_most_one_stacked_weight_more_than_the_model(monkeypatch, direction,
                                                                                 collections_of_this_test):
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


def test_a_lora_run_under_scan_layers_stacks_its_loaded_base_without_a_second_copy(tmp_path, monkeypatch,
                                                                                  collections_of_this_test):
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
