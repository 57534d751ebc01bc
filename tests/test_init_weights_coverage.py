"""`put_weights` refuses weights that leave out a variable the source set: placed anyway, that variable would keep
its random initial value in the second state (DPO's policy after its reference), silently; `initialise_from` refuses
a source tensor this model has no place for, and a tensor of this model the source lacks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easytrain.errors import ArgumentError
from easytrain.models import init_model
from easytrain.state import TrainState, raw_key, split_model
from easytrain.trainers import init_weights
from model_configs import tiny_config


def make_state(seed: int) -> TrainState:
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {"dense": {"kernel": jax.random.normal(keys[0], (2, 3)), "bias": jax.random.normal(keys[1], (3,))},
              "adapter": {"lora_a": jax.random.normal(keys[2], (3, 1))}}
    model_state = {"norm": {"mean": jax.random.normal(keys[3], (3,)), "count": jnp.zeros((), jnp.int32)}}
    return TrainState.create(graphdef=None, params=params, model_state=model_state, tx=optax.sgd(0.1),
                             rng=jax.random.key_data(jax.random.key(seed)))


def shardings_of(state: TrainState) -> TrainState:
    return jax.tree.map(lambda leaf: leaf.sharding, state)


@pytest.fixture
def read_once():
    """`replaced_weights` of a state whose source set everything but the adapter (kept fresh, as LoRA's are)."""
    before = make_state(0)
    params = {**before.params, "dense": {"kernel": jnp.full((2, 3), 7.0), "bias": jnp.full((3,), 8.0)}}
    after = before.replace(params=params, model_state={"norm": {**before.model_state["norm"],
                                                                "mean": jnp.full((3,), 9.0)}})
    return init_weights.replaced_weights(before, after)


def test_weights_the_source_set_are_put_and_the_ones_it_left_stay_fresh(read_once):
    assert set(read_once) == {("dense", "kernel"), ("dense", "bias"), ("norm", "mean")}
    state = make_state(1)
    placed = init_weights.put_weights(state, shardings_of(state), read_once)
    np.testing.assert_array_equal(placed.params["dense"]["bias"], np.full((3,), 8.0))
    np.testing.assert_array_equal(placed.model_state["norm"]["mean"], np.full((3,), 9.0))
    np.testing.assert_array_equal(placed.params["adapter"]["lora_a"], state.params["adapter"]["lora_a"])


def test_weights_missing_a_variable_the_source_set_are_refused_naming_it(read_once):
    del read_once[("dense", "bias")]
    state = make_state(1)
    with pytest.raises(ValueError, match=r"1 variable\(s\) the source set are missing: dense\.bias") as info:
        init_weights.put_weights(state, shardings_of(state), read_once)
    assert "lora_a" not in str(info.value), "a variable the source left fresh is not missing"


def test_a_plain_mapping_must_cover_every_weight_of_the_state(read_once):
    given = {path: value for path, value in read_once.items() if path != ("norm", "mean")}
    state = make_state(1)
    with pytest.raises(ValueError, match=r"2 variable\(s\) .* missing: adapter\.lora_a, norm\.mean"):
        init_weights.put_weights(state, shardings_of(state), given)
    everything = {**read_once, ("adapter", "lora_a"): jnp.zeros((3, 1))}
    assert init_weights.put_weights(state, shardings_of(state), dict(everything)) is not None


def test_weights_of_another_layout_still_give_none(read_once):
    state = make_state(1)
    misshapen = {**read_once, ("dense", "bias"): jnp.zeros((4,))}
    assert init_weights.put_weights(state, shardings_of(state), misshapen) is None


def test_an_untied_source_into_a_tied_model_is_refused_naming_its_head(tmp_path):
    """A fresh start from an export with an `lm_head` into a tied model (no head) would drop the trained head without
    a word: the refusal lists it as not in this model (docs/checkpoints.md, "Every tensor must fit")."""
    source = init_model(tiny_config(num_hidden_layers=1, tie_word_embeddings=False))
    graphdef, params, rest = split_model(init_model(tiny_config(num_hidden_layers=1, tie_word_embeddings=True)))
    state = TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.sgd(0.1),
                              rng=raw_key(0))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")  # an export directory's files; load_pretrained reads none
    with pytest.raises(ArgumentError) as refusal:
        init_weights.initialise_from(str(tmp_path), state, shardings_of(state), load_pretrained=lambda _: source,
                                     fresh_ok=lambda path, part: False)
    assert refusal.value.field == "init_weights_from"
    assert "(1 tensor(s): lm_head.kernel: not in this model)" in refusal.value.message


def test_a_tied_source_into_an_untied_model_is_refused_naming_its_head(tmp_path):
    """The other direction: a tied export has no `lm_head`, so an untied model would keep a random head and train from
    there; the refusal lists it as missing from the source."""
    source = init_model(tiny_config(num_hidden_layers=1, tie_word_embeddings=True))
    graphdef, params, rest = split_model(init_model(tiny_config(num_hidden_layers=1, tie_word_embeddings=False)))
    state = TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.sgd(0.1),
                              rng=raw_key(0))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ArgumentError) as refusal:
        init_weights.initialise_from(str(tmp_path), state, shardings_of(state), load_pretrained=lambda _: source,
                                     fresh_ok=lambda path, part: False)
    assert refusal.value.field == "init_weights_from"
    assert "(1 tensor(s): lm_head.kernel: missing from the source)" in refusal.value.message
