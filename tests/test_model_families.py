"""Mistral, Qwen2 and Qwen3 (and Llama) through the one model code path, against transformers."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx, traverse_util
from safetensors.numpy import load_file

from easytrain.models import (
    ConfigError,
    LlamaForCausalLM,
    UnsupportedConfigError,
    init_model,
    load_pretrained,
    save_pretrained,
)
from easytrain.models.attention import attention_mask, causal_mask
from easytrain.models.families import features_of

torch = pytest.importorskip("torch")

from model_configs import family_config, forward, reference_logits, right_padded_batch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def reference_model(config: transformers.PretrainedConfig, seed: int = 0):
    """The family's PyTorch model with every tensor (biases and norms included) randomised."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def params_by_name(model: LlamaForCausalLM) -> dict[str, jax.Array]:
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {"/".join(map(str, path)): value for path, value in flat.items()}


def real_token_error(model: LlamaForCausalLM, reference, seed: int = 0) -> float:
    """Largest logit difference over the real (unpadded) tokens of ``right_padded_batch``."""
    ids_BT, mask_BT = right_padded_batch(seed, lengths=(12, 9, 3))
    ours_BTV = np.asarray(forward(model, jnp.asarray(ids_BT), jnp.asarray(mask_BT)))
    real = mask_BT.astype(bool)
    return float(np.abs(ours_BTV[real] - reference_logits(reference, ids_BT, mask_BT)[real]).max())


@pytest.fixture(params=FAMILIES)
def checkpoint(request, tmp_path):
    """(directory, reference model) of a randomised tiny checkpoint of each family."""
    reference = reference_model(family_config(request.param))
    reference.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", reference


def test_loaded_checkpoint_matches_reference_logits(checkpoint):
    directory, reference = checkpoint
    model = load_pretrained(directory)
    assert type(model.config) is type(reference.config)
    assert real_token_error(model, reference) <= 1e-4


def test_round_trip_reproduces_tensors_and_transformers_logits(checkpoint, tmp_path):
    directory, reference = checkpoint
    model = load_pretrained(directory)
    save_pretrained(tmp_path / "out", model, model.config)
    original = load_file(directory / "model.safetensors")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == written.keys()
    for name, tensor in original.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(exported) is type(reference)
    assert real_token_error(model, exported, seed=1) <= 1e-4


def test_windowed_mask_follows_transformers_boundary():
    from transformers.masking_utils import sliding_window_causal_mask_function

    index = torch.arange(7)
    expected_TS = sliding_window_causal_mask_function(3)(0, 0, index[:, None], index[None, :]).numpy()
    ours_TS = np.asarray(causal_mask(jnp.arange(7), jnp.arange(7), 3))
    np.testing.assert_array_equal(ours_TS, expected_TS)
    assert ours_TS.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3, 3]  # The query and 2 before it.
    full_BTS, windowed_BTS = attention_mask(1, 7), attention_mask(1, 7, sliding_window=3)
    assert not np.array_equal(full_BTS, windowed_BTS)


def test_mistral_window_changes_logits(tmp_path):
    reference = reference_model(family_config("mistral"))
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.features.windows == (4, 4)
    assert real_token_error(model, reference) <= 1e-4
    model.features = dataclasses.replace(model.features, windows=(None, None))  # Plain causal attention.
    assert real_token_error(model, reference) > 1e-2


def test_qwen3_head_norms_are_loaded_and_change_logits(tmp_path):
    reference = reference_model(family_config("qwen3"))
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    params = params_by_name(model)
    expected = reference.model.layers[1].self_attn.k_norm.weight.detach().numpy()
    np.testing.assert_array_equal(params["layers/1/self_attn/k_norm/scale"], expected)
    assert params["layers/0/self_attn/q_norm/scale"].shape == (24,)
    for layer in model.layers:  # The same weights without the per-head norms.
        layer.self_attn.q_norm = layer.self_attn.k_norm = None
    assert real_token_error(model, reference) > 1e-2


def test_qwen2_biases_q_k_v_but_not_o():
    params = params_by_name(init_model(family_config("qwen2")))
    biased = {name.split("/")[-2] for name in params if name.endswith("/bias")}
    assert biased == {"q_proj", "k_proj", "v_proj"}


def test_family_switches_are_resolved_from_the_config():
    assert features_of(family_config("qwen2")).windows == (None, 3)  # max_window_layers=1.
    assert features_of(family_config("qwen2", use_sliding_window=False)).windows == (None, None)
    assert features_of(family_config("mistral", sliding_window=None)).windows == (None, None)
    qwen3 = features_of(family_config("qwen3", attention_bias=False))
    assert (qwen3.qkv_bias, qwen3.o_bias, qwen3.qk_norm) == (False, False, True)


def test_unsupported_family_and_bad_windows_are_rejected():
    with pytest.raises(UnsupportedConfigError, match="model_type = 'gpt2'.*qwen3"):
        init_model(transformers.GPT2Config())
    layer_types = ["sliding_attention", "full_attention"]
    config = family_config("qwen2", use_sliding_window=False, layer_types=layer_types)
    with pytest.raises(ConfigError, match="sliding_window is None"):
        init_model(config)
    with pytest.raises(ConfigError, match="sliding_window = 0"):
        init_model(family_config("mistral", sliding_window=0))


def test_rms_norm_eps_is_read_from_the_config(tmp_path):
    """Every family test config keeps transformers' 1e-6, so a norm built with a fixed eps would still match them:
    a large eps moves Qwen3's logits through each of its norms (decoder layers, final, per-head q/k)."""
    reference = reference_model(family_config("qwen3", rms_norm_eps=0.5))
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert real_token_error(model, reference) <= 1e-4
