"""A tied-embedding checkpoint that stores the shared matrix only as ``lm_head.weight`` (no
``model.embed_tokens.weight``) loads as transformers loads it: the head is read as the embedding."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from easytrain.models import CheckpointError, from_hf_state_dict, from_pretrained, init_model, to_hf_state_dict

torch = pytest.importorskip("torch")

from model_configs import forward, reference_logits, right_padded_batch, tiny_config

EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def head_only_checkpoint(directory, max_shard_size: str | None = None):
    """A tied transformers model saved with its embedding renamed to lm_head.weight, and the model itself."""
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    reference.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    index = directory / "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    for file in files:
        tensors = load_file(file)
        if EMBEDDING in tensors:
            tensors[HEAD] = tensors.pop(EMBEDDING)
            save_file(tensors, file, metadata={"format": "pt"})
    if index.is_file():
        raw = json.loads(index.read_text())
        raw["weight_map"][HEAD] = raw["weight_map"].pop(EMBEDDING)
        index.write_text(json.dumps(raw))
    return reference


@pytest.mark.parametrize("max_shard_size", [None, "60KB"], ids=["one-file", "sharded"])
def test_a_tied_checkpoint_storing_only_the_head_loads_with_transformers_logits(tmp_path, max_shard_size):
    reference = head_only_checkpoint(tmp_path, max_shard_size=max_shard_size)
    stored = {name for file in tmp_path.glob("*.safetensors") for name in load_file(file)}
    assert HEAD in stored and EMBEDDING not in stored
    ids_BT, mask_BT = right_padded_batch()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    expected = reference_logits(reloaded, ids_BT, mask_BT)
    np.testing.assert_array_equal(expected, reference_logits(reference, ids_BT, mask_BT))
    for model in (from_pretrained(tmp_path), from_pretrained(tmp_path, scan_layers=True)):
        ours = np.asarray(forward(model, jnp.asarray(ids_BT), jnp.asarray(mask_BT)))
        real = mask_BT.astype(bool)
        assert np.abs(ours[real] - expected[real]).max() <= 1e-4


def test_the_dict_conversion_reads_a_lone_head_as_the_embedding_too():
    config = tiny_config(tie_word_embeddings=True)
    params = nnx.to_pure_dict(nnx.state(init_model(config, seed=1), nnx.Param))
    tensors = to_hf_state_dict(params, config)
    tensors[HEAD] = tensors.pop(EMBEDDING)
    np.testing.assert_array_equal(from_hf_state_dict(tensors, config)["embed_tokens"]["embedding"],
                                  params["embed_tokens"]["embedding"])


def test_an_untied_checkpoint_without_its_embedding_is_still_refused(tmp_path):
    transformers.LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[EMBEDDING]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"missing \(1\): {EMBEDDING}"):
        from_pretrained(tmp_path)
