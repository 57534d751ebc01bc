"""Checkpoint inputs that loaded silently wrong, or read files from elsewhere, are refused by name when read:

- a tensor whose values the cast to `param_dtype` makes inf (a float64 weight beyond float32's range, a float32
  one beyond bfloat16's) loaded as inf, so the model computed inf/NaN logits;
- a `generation_config.json` token id that is not a token id (`"x"`, 2.5, true, an EOS of -1) was kept, and `generate`
  failed far from the file, or never stopped (an EOS of -1 never matches);
- a shard index naming a file outside the checkpoint directory (`../x.safetensors`, an absolute path) had that
  file opened, and was then called out of sync with the shards, naming a tensor rather than the entry (and a
  shard in a subdirectory, which transformers reads, was refused the same way).
"""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from easytrain.models import CheckpointError, from_pretrained, init_model, save_pretrained
from easytrain.models import narrowing
from easytrain.models.hf_load import generation_config_of, read_generation_config

import saved_checkpoints
from model_configs import tiny_config

DOWN = "model.layers.1.mlp.down_proj.weight"
FLOAT32_MAX = float(np.finfo(np.float32).max)


saved = saved_checkpoints.saved  # a module-scoped fixture: the model saved whole (float32), sharded and as an adapter


# --- values the cast to param_dtype makes inf -------------------------------------------------------------

def with_weights(saved, tmp_path, dtype, value: float, name: str = "whole"):
    """A copy of the whole checkpoint stored as `dtype`, DOWN[5, 3] set to `value`."""
    directory = shutil.copytree(saved / name, tmp_path / name)
    tensors = {key: array.astype(dtype) for key, array in load_file(directory / "model.safetensors").items()}
    tensors[DOWN][5, 3] = value
    save_file(tensors, directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("stored, value, param_dtype, match", [
    (np.float64, 1.0e300, jnp.float32, r"param_dtype='float32' .*largest \|value\| 1e\+300\. .*checkpoint"),
    (np.float64, -1.0e39, jnp.float32, r"param_dtype='float32' .*largest \|value\| 1e\+39\. "),
    (np.float64, 1.0e300, jnp.bfloat16, r"param_dtype='bfloat16' .*largest \|value\| 1e\+300\. .*checkpoint"),
    (np.float32, FLOAT32_MAX, jnp.bfloat16, r"param_dtype='bfloat16' .*3\.40282e\+38\. .*param_dtype='float32'"),
])
def test_a_weight_the_cast_makes_inf_is_refused_by_name(saved, tmp_path, stored, value, param_dtype, match):
    """Was: loaded, the weight inf in the model."""
    directory = with_weights(saved, tmp_path, stored, value)
    with pytest.raises(CheckpointError, match=match) as info:
        from_pretrained(directory, param_dtype=param_dtype)
    assert DOWN in str(info.value)


@pytest.mark.parametrize("stored, value, param_dtype, loaded", [
    (np.float64, 3.4028235e38, jnp.float32, FLOAT32_MAX),  # rounds to float32's largest: finite
    (np.float64, 1.0e30, jnp.bfloat16, float(jnp.bfloat16(1.0e30))),  # rounded, finite
    (np.float64, float("inf"), jnp.float32, float("inf")),  # inf in any dtype: loads as stored
    (np.float32, 3.0e38, jnp.bfloat16, float(jnp.bfloat16(3.0e38))),
])
def test_a_weight_the_cast_only_rounds_loads(saved, tmp_path, stored, value, param_dtype, loaded):
    directory = with_weights(saved, tmp_path, stored, value)
    model = from_pretrained(directory, param_dtype=param_dtype)
    assert float(model.layers[1].mlp.down_proj.kernel.value[3, 5]) == loaded


def test_float64_peaks_cross_processes_exactly(saved, tmp_path, monkeypatch):
    """The peaks travel between processes through JAX, which holds float64 as float32 unless x64 is on: a peak of
    1e300 must arrive as 1e300 (not inf) on every process, and be named as such."""
    directory = with_weights(saved, tmp_path, np.float64, 1.0e300)
    monkeypatch.setattr(narrowing.jax, "process_count", lambda: 2)
    monkeypatch.setattr(narrowing.multihost_utils, "process_allgather",
                        lambda local: np.stack([np.asarray(jnp.asarray(local))] * 2))
    with pytest.raises(CheckpointError, match=r"param_dtype='float32' cannot hold 1 tensor\(s\).*largest \|value\| "
                                              r"1e\+300\. "):
        from_pretrained(directory, param_dtype=jnp.float32)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32, np.float64])
def test_the_overflow_test_reads_every_inf_and_nan_from_the_bits(dtype):
    """Signed and unsigned maxima of the bits: a negative NaN, a negative inf and the largest finite values of
    either sign must each be told apart."""
    largest = float(jnp.finfo(dtype).max)
    assert not narrowing.cast_overflowed(np.array([[largest, -largest], [0.0, -0.0]], dtype))
    assert not narrowing.cast_overflowed(np.zeros((0, 3), dtype))
    for value in (np.inf, -np.inf, np.nan, -np.nan):
        block = np.ones((3, 4), dtype)
        block[1, 2] = value
        assert narrowing.cast_overflowed(block), value


# --- generation_config.json token ids ---------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("eos_token_id", "x"),  # was: kept; generate raised "must hold int token ids" at its first call
    ("eos_token_id", 2.5),
    ("eos_token_id", 2.0),
    ("eos_token_id", [1, "x"]),
    ("eos_token_id", -1),  # was: kept; generate never stopped
    ("eos_token_id", [2, -1]),
    ("eos_token_id", True),
    ("eos_token_id", [[1, 2]]),
    ("pad_token_id", [0, 1]),
    ("bos_token_id", "1"),
    ("decoder_start_token_id", False),
])
def test_a_token_id_that_is_no_token_id_is_refused_when_read(saved, tmp_path, field, value):
    directory = shutil.copytree(saved / "whole", tmp_path / "whole")
    path = directory / "generation_config.json"
    path.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, field: value}))
    match = rf"{path}.*'{field}' to {re.escape(json.dumps(value))}, .*int.*null"
    with pytest.raises(CheckpointError, match=match):
        read_generation_config(directory)
    with pytest.raises(CheckpointError, match=match):
        from_pretrained(directory)


@pytest.mark.parametrize("fields", [
    {"eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000},  # Llama-3.1 Instruct
    {"eos_token_id": 151645, "pad_token_id": 151643, "bos_token_id": 151643},  # Qwen2.5 Instruct
    {"eos_token_id": None, "pad_token_id": None, "bos_token_id": 0, "decoder_start_token_id": [0]},
    {"eos_token_id": []},
    {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1},  # LLaMA-1 conversions (decapoda-research)
])
def test_token_ids_and_lists_of_them_are_read(saved, tmp_path, fields):
    directory = shutil.copytree(saved / "whole", tmp_path / "whole")
    (directory / "generation_config.json").write_text(json.dumps(fields))
    config = json.loads((directory / "config.json").read_text())  # real ids lie under a real vocabulary
    (directory / "config.json").write_text(json.dumps(config | {"vocab_size": 152064}))
    config = read_generation_config(directory)
    assert config.eos_token_id == fields["eos_token_id"]


def test_an_export_of_a_config_with_pad_minus_one_loads_back(tmp_path):
    """save_pretrained derives generation_config.json from config.json (GenerationConfig.from_model_config), which
    copies a LLaMA-1 conversion's pad_token_id of -1 there."""
    model = init_model(tiny_config(pad_token_id=-1), seed=0)
    directory = save_pretrained(tmp_path / "export", model, model.config)
    assert json.loads((directory / "generation_config.json").read_text())["pad_token_id"] == -1
    assert generation_config_of(from_pretrained(directory)).pad_token_id == -1


# --- shard index entries outside the checkpoint directory -------------------------------------------------

def _remap(directory, outside) -> None:
    """Moves the first shard to `outside(name)` and points the index's entries for it there."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    target = outside(first)
    (directory / first).rename(directory / target)
    index["weight_map"] = {name: str(target) if file == first else file for name, file in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return str(target)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_an_index_entry_outside_the_directory_is_refused(saved, tmp_path, where):
    """Was: the shard was read from outside the checkpoint (the hub cannot hold such an entry)."""
    directory = shutil.copytree(saved / "sharded", tmp_path / "model")
    outside = {"parent": lambda name: f"../{name}", "absolute": lambda name: tmp_path / name}[where]
    entry = _remap(directory, outside)
    refusal = rf"{directory}.*index\.json.*{entry}.*outside {directory}.*move the shards into.*again"
    with pytest.raises(CheckpointError, match=refusal):
        from_pretrained(directory)


def test_shards_in_a_subdirectory_load_as_transformers_reads_them(saved, tmp_path):
    """transformers joins each entry to the directory, so `shards/<name>` is read from inside it."""
    directory = shutil.copytree(saved / "sharded", tmp_path / "model")
    (directory / "shards").mkdir()
    _remap(directory, lambda name: f"shards/{name}")
    expected = from_pretrained(saved / "sharded")
    model = from_pretrained(directory)
    np.testing.assert_array_equal(model.embed_tokens.embedding.value, expected.embed_tokens.embedding.value)


#: The largest float64 below bfloat16's overflow point (2**128 - 2**119): rounded once, bfloat16's largest value;
#: numpy's cast (ml_dtypes) rounds it to float32 first, to the overflow point itself, and then to inf.
JUST_UNDER_BFLOAT16_OVERFLOW = float(np.nextafter(2.0**128 - 2.0**119, 0.0))


def test_a_float64_weight_the_cast_double_rounds_to_inf_is_refused(saved, tmp_path):
    """Was: loaded as inf: its |value| is under the overflow point, but the cast that loads it makes it inf."""
    assert np.isinf(np.asarray(JUST_UNDER_BFLOAT16_OVERFLOW, jnp.bfloat16))  # the reference: numpy's cast
    directory = with_weights(saved, tmp_path, np.float64, JUST_UNDER_BFLOAT16_OVERFLOW)
    with pytest.raises(CheckpointError, match=r"param_dtype='bfloat16' .*3\.39618e\+38\. Pass param_dtype='float32'"):
        from_pretrained(directory, param_dtype=jnp.bfloat16)


def _edges(source, target) -> list[float]:
    """`source` values around `target`'s largest value and the point past which it rounds to inf."""
    top = float(jnp.finfo(target).max)
    points = [top, 2.0 ** int(jnp.finfo(target).maxexp) - 2.0 ** (int(jnp.finfo(target).maxexp)
                                                                   - int(jnp.finfo(target).nmant) - 2)]
    with np.errstate(over="ignore"):
        near = [np.asarray(p, source) for p in points]
        return sorted({float(v) for p in near for v in (np.nextafter(p, 0 * p), p, np.nextafter(p, np.inf * p))
                       if np.isfinite(v)})


@pytest.mark.parametrize("source, target", [(np.float32, np.float16), (np.float64, np.float16),
                                            (jnp.bfloat16, np.float16), (np.float32, jnp.bfloat16),
                                            (np.float64, jnp.bfloat16), (np.float64, np.float32)])
def test_the_range_test_agrees_with_the_cast_at_every_edge(source, target):
    """`becomes_inf` of a peak, `cast_overflowed` of the cast block and numpy's cast (the reference) agree, both
    signs, just under, at and over the rounding point."""
    for value in _edges(source, target):
        for signed in (value, -value):
            with np.errstate(over="ignore"):
                cast = np.asarray(np.asarray([signed, 1.0], source), target)
            expected = bool(np.isinf(cast[0]))
            assert narrowing.becomes_inf(signed, target) == expected, (signed, source, target)
            assert narrowing.cast_overflowed(cast) == expected, (signed, source, target)


def test_a_hub_snapshot_whose_files_link_outside_it_loads(saved, tmp_path):
    """The hub cache links every snapshot file (index and shards included) to a blob outside the snapshot
    directory: links are not followed by the index check, so the snapshot loads as its copy does."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / ("0" * 40)
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((saved / "sharded").iterdir())):
        shutil.copyfile(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    model = from_pretrained(snapshot)
    np.testing.assert_array_equal(model.embed_tokens.embedding.value,
                                  from_pretrained(saved / "sharded").embed_tokens.embedding.value)


@pytest.mark.parametrize("field, value", [("eos_token_id", -1), ("bos_token_id", -1), ("eos_token_id", [2, -1])])
def test_a_config_json_token_id_that_is_no_token_id_is_refused_without_a_generation_config(tmp_path, field, value):
    """Was: loaded (transformers only warns); its export then wrote generation_config.json derived from config.json,
    which the reload refused, and deleting that file, as the refusal advised, derived the same one again."""
    model = init_model(tiny_config(), seed=0)  # init_model refuses such a config (tests/test_token_id_range.py)
    directory = save_pretrained(tmp_path / "export", model, model.config)
    (directory / "generation_config.json").unlink()
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {field: value}))
    with pytest.raises(CheckpointError, match=rf"{directory / 'config.json'} sets '{field}' to "
                                              rf"{re.escape(json.dumps(value))}, .*Fix config\.json"):
        from_pretrained(directory)


def test_index_entries_spelled_with_dot_segments_load(saved, tmp_path):
    """`./name` and `shards/../name` name a file inside the directory: read as `name` (one file, once)."""
    directory = shutil.copytree(saved / "sharded", tmp_path / "model")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    spellings = ["./{}", "shards/../{}", "{}"]
    index["weight_map"] = {name: spellings[i % 3].format(file) for i, (name, file) in
                           enumerate(sorted(index["weight_map"].items()))}
    index_path.write_text(json.dumps(index))
    np.testing.assert_array_equal(from_pretrained(directory).embed_tokens.embedding.value,
                                  from_pretrained(saved / "sharded").embed_tokens.embedding.value)
