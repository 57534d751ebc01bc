"""Sharded export fills its files as transformers' own save_pretrained does: tensors in the model's module order
(embedding, each layer's attention, q/k norms, MLP and norms, final norm, head), so at the same max_shard_size
the index's weight_map is the same file for file. Also: a storage dtype that is not a dtype is a CheckpointError."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import transformers

from easytrain.models import from_pretrained, save_pretrained
from easytrain.models.families import SUPPORTED_MODEL_TYPES
from easytrain.models.hf_io import CheckpointError, WEIGHTS_INDEX_NAME

from model_configs import family_config

torch = pytest.importorskip("torch")

SHARD = "20KB"  # a few tensors per file: any misplaced tensor moves the file boundaries
CASES = [(family, tied) for family in SUPPORTED_MODEL_TYPES for tied in (False, True)]


def index_of(directory: Path) -> dict:
    return json.loads((directory / WEIGHTS_INDEX_NAME).read_text())


def transformers_checkpoint(directory: Path, model_type: str, tied: bool) -> Path:
    """transformers' own sharded save of a tiny model of the family (Qwen2: q/k/v biases; Qwen3: q/k norms)."""
    torch.manual_seed(0)
    config = family_config(model_type, tie_word_embeddings=tied)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size=SHARD)
    return directory


@pytest.mark.parametrize("model_type, tied", CASES)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_export_has_the_weight_map_of_transformers(tmp_path, model_type, tied, scan_layers):
    reference = transformers_checkpoint(tmp_path / "reference", model_type, tied)
    model = from_pretrained(reference, scan_layers=scan_layers)
    ours = save_pretrained(tmp_path / "ours", model, model.config, max_shard_size=SHARD)
    expected, got = index_of(reference), index_of(ours)
    assert len(set(expected["weight_map"].values())) > 3, "the test needs several shard files"
    assert got["weight_map"] == expected["weight_map"]
    assert got["metadata"]["total_size"] == expected["metadata"]["total_size"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32", object()])
def test_a_storage_dtype_that_is_not_a_dtype_is_a_checkpoint_error(tmp_path, dtype):
    model = from_pretrained(transformers_checkpoint(tmp_path / "reference", "llama", False))
    with pytest.raises(CheckpointError, match=r"dtype=.*'bfloat16'"):
        save_pretrained(tmp_path / "out", model, model.config, dtype=dtype)
    assert not (tmp_path / "out").exists(), "nothing is written before the dtype is checked"
