"""Exported weights are readable as the process's umask allows, like every other file written beside them: a model
exported on a shared filesystem must be loadable by the other users of a group (safetensors writes 0600)."""

from __future__ import annotations

import os
import stat

import pytest
from flax import nnx

from easytrain import lora
from easytrain.models import init_model, save_pretrained
from easytrain.models.peft_io import save_peft_adapter
from model_configs import tiny_config


@pytest.fixture
def group_readable_umask():
    previous = os.umask(0o022)
    yield 0o644
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_exported_weights_follow_the_umask_as_the_config_does(tmp_path, group_readable_umask):
    config = tiny_config()
    model = init_model(config)
    save_pretrained(tmp_path / "export", nnx.to_pure_dict(nnx.state(model, nnx.Param)), config)
    assert _mode(tmp_path / "export" / "config.json") == group_readable_umask
    assert _mode(tmp_path / "export" / "model.safetensors") == group_readable_umask


def test_sharded_export_and_adapter_follow_the_umask(tmp_path, group_readable_umask):
    config = tiny_config()
    model = init_model(config)
    save_pretrained(tmp_path / "sharded", model, config, max_shard_size=20_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and all(_mode(shard) == group_readable_umask for shard in shards)
    adapted = lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(0))
    adapter = save_peft_adapter(tmp_path / "adapter", adapted, lora.LoRAConfig(rank=2, alpha=4))
    assert _mode(adapter / "adapter_model.safetensors") == group_readable_umask


def test_weight_files_with_the_same_tensors_and_metadata_are_the_same_bytes(tmp_path):
    """safetensors keeps metadata in a hash map, so two keys came out in either order from one write to the next:
    an adapter exported twice from the same weights differed in its bytes (checksums, 'same export?')."""
    import numpy as np

    from easytrain.models.weight_files import write_safetensors

    tensors = {"b": np.zeros(3, np.float32), "a": np.ones(2, np.float32)}
    metadata = {"format": "pt", "easytrain_base_fingerprint": '{"x": 1}', "zeta": "ü"}
    written = {write_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata).read_bytes() for i in range(12)}
    assert len(written) == 1
