"""Checkpoint inputs that loaded silently wrong, or read files from elsewhere, are refused by name when read:

- a `generation_config.json` token id that is not a token id (`"x"`, 2.5, true, -1) was kept, and `generate`
  failed far from the file, or never stopped (an EOS of -1 never matches);
- a shard index naming a file outside the checkpoint directory (`../x.safetensors`, an absolute path) had that
  file opened, and was then called out of sync with the shards, naming a tensor rather than the entry (and a
  shard in a subdirectory, which transformers reads, was refused the same way).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from easytrain.models import CheckpointError, from_pretrained, init_model, save_pretrained
from easytrain.models.hf_load import read_generation_config

from model_configs import tiny_config

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny model saved whole (float32) and sharded."""
    root = tmp_path_factory.mktemp("refusals")
    model = init_model(tiny_config(), seed=0)
    save_pretrained(root / "whole", model, model.config)
    save_pretrained(root / "sharded", model, model.config, max_shard_size=20000)
    return root


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
    ("pad_token_id", -1),  # was: kept; generate wrote -1 after each row's EOS
    ("pad_token_id", [0, 1]),
    ("bos_token_id", "1"),
    ("decoder_start_token_id", False),
])
def test_a_token_id_that_is_no_token_id_is_refused_when_read(saved, tmp_path, field, value):
    directory = shutil.copytree(saved / "whole", tmp_path / "whole")
    path = directory / "generation_config.json"
    path.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, field: value}))
    match = rf"{path}.*'{field}' to {re.escape(json.dumps(value))}, .*(null|non-negative)"
    with pytest.raises(CheckpointError, match=match):
        read_generation_config(directory)
    with pytest.raises(CheckpointError, match=match):
        from_pretrained(directory)


@pytest.mark.parametrize("fields", [
    {"eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000},  # Llama-3.1 Instruct
    {"eos_token_id": 151645, "pad_token_id": 151643, "bos_token_id": 151643},  # Qwen2.5 Instruct
    {"eos_token_id": None, "pad_token_id": None, "bos_token_id": 0, "decoder_start_token_id": [0]},
    {"eos_token_id": []},
])
def test_token_ids_and_lists_of_them_are_read(saved, tmp_path, fields):
    directory = shutil.copytree(saved / "whole", tmp_path / "whole")
    (directory / "generation_config.json").write_text(json.dumps(fields))
    config = read_generation_config(directory)
    assert config.eos_token_id == fields["eos_token_id"]


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
    with pytest.raises(CheckpointError, match=rf"{directory}.*index\.json.*{entry}.*outside {directory}.*again"):
        from_pretrained(directory)


def test_shards_in_a_subdirectory_load_as_transformers_reads_them(saved, tmp_path):
    """transformers joins each entry to the directory, so `shards/<name>` is read from inside it."""
    directory = shutil.copytree(saved / "sharded", tmp_path / "model")
    (directory / "shards").mkdir()
    _remap(directory, lambda name: f"shards/{name}")
    expected = from_pretrained(saved / "sharded")
    model = from_pretrained(directory)
    np.testing.assert_array_equal(model.embed_tokens.embedding.value, expected.embed_tokens.embedding.value)
