"""A damaged checkpoint or adapter file (an interrupted download or copy) is refused with a CheckpointError that
names the file and says to fetch it again, not a JSONDecodeError, SafetensorError or AttributeError naming none."""

import shutil

import jax.numpy as jnp
import pytest

from easytrain.models import init_model, load_pretrained
from easytrain.models.hf_io import CheckpointError
from easytrain.models.peft_io import load_peft_adapter

import saved_checkpoints
from model_configs import tiny_config


saved = saved_checkpoints.saved  # a module-scoped fixture: the model saved whole, sharded and as an adapter


def damaged(saved, tmp_path, kind: str, name: str, content: bytes | None = None):
    """A copy of ``saved / kind`` whose file ``name`` (a glob) holds ``content`` (default: its first half)."""
    directory = shutil.copytree(saved / kind, tmp_path / kind)
    file = next(directory.glob(name))
    file.write_bytes(content if content is not None else file.read_bytes()[: file.stat().st_size // 2])
    return directory, file


@pytest.mark.parametrize("kind, name, content", [
    ("whole", "config.json", None),  # was JSONDecodeError: Expecting property name enclosed in double quotes
    ("whole", "config.json", b"[1, 2]"),  # was AttributeError: 'list' object has no attribute 'get'
    ("whole", "config.json", b"\xff\xfe"),  # was UnicodeDecodeError
    ("sharded", "model.safetensors.index.json", None),  # was JSONDecodeError
    ("whole", "model.safetensors", None),  # was SafetensorError: incomplete metadata, file not fully covered
    ("sharded", "model-00002-of-*.safetensors", b""),  # was SafetensorError: header too small
    ("sharded", "model.safetensors.index.json", b'{"weight_map": {"lm_head.weight": 5}}'),  # was TypeError
    ("sharded", "model.safetensors.index.json", b'{"weight_map": {"lm_head.weight": ["a"]}}'),  # was TypeError
    ("sharded", "model.safetensors.index.json", b'{"weight_map": ["model-00001-of-00002.safetensors"]}'),
    ("sharded", "model.safetensors.index.json", b'{"weight_map": {}}'),  # was: "missing (21) ... check the config"
    ("whole", "generation_config.json", b"[1, 2]"),  # was TypeError: 'list' object is not a mapping
    ("whole", "generation_config.json", b"null"),  # was TypeError: 'NoneType' object is not a mapping
    ("whole", "generation_config.json", None),  # was: "is not a valid JSON file", without the fetch-again advice
])
def test_a_damaged_checkpoint_file_is_named(saved, tmp_path, kind, name, content):
    directory, file = damaged(saved, tmp_path, kind, name, content)
    with pytest.raises(CheckpointError, match=f"{file}.*again"):
        load_pretrained(directory)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_damaged_adapter_file_is_named(saved, tmp_path, name):
    directory, file = damaged(saved, tmp_path, "adapter", name)
    with pytest.raises(CheckpointError, match=f"{file}.*again"):
        load_peft_adapter(directory, init_model(tiny_config(), seed=0, dtype=jnp.float32))


def test_a_tensor_held_by_two_shards_is_named_with_both(saved, tmp_path):
    """The later file's copy was read silently, or the index was called out of sync with a shard that does hold the
    tensor: the two files are named, whichever the index maps it to."""
    from safetensors.numpy import load_file, save_file

    directory = shutil.copytree(saved / "sharded", tmp_path / "sharded")
    first, second = sorted(directory.glob("model-0*.safetensors"))[:2]
    tensors, name = load_file(second), next(iter(load_file(first)))
    save_file({**tensors, name: load_file(first)[name] * 2}, second)
    with pytest.raises(CheckpointError, match=rf"{name}.*{first.name}.*{second.name}.*again"):
        load_pretrained(directory)


@pytest.mark.parametrize("fingerprint", ["{", "[1, 2]"])  # were JSONDecodeError, AttributeError naming no file
def test_a_damaged_base_fingerprint_is_named(saved, tmp_path, fingerprint):
    from safetensors.numpy import load_file, save_file

    from easytrain.models.peft_io import FINGERPRINT_KEY

    directory = shutil.copytree(saved / "adapter", tmp_path / "adapter")
    file = directory / "adapter_model.safetensors"
    save_file(load_file(file), file, metadata={"format": "pt", FINGERPRINT_KEY: fingerprint})
    with pytest.raises(CheckpointError, match=f"{file}.*{FINGERPRINT_KEY}.*again"):
        load_peft_adapter(directory, init_model(tiny_config(), seed=0, dtype=jnp.float32), verify_base=True)
