"""Hugging Face checkpoint conversion, checked against the PyTorch reference model."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file

from easytrain.models import (
    CheckpointError,
    LlamaForCausalLM,
    from_hf_state_dict,
    init_model,
    load_pretrained,
    save_pretrained,
    to_hf_state_dict,
)

torch = pytest.importorskip("torch")

from model_configs import tiny_config, forward, reference_logits, right_padded_batch


def reference_model(config: transformers.LlamaConfig, seed: int = 0):
    """PyTorch model with every tensor (biases and norms included) randomised."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def randomise(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Perturbs every parameter so zero biases and unit norms are exercised too."""
    rng = np.random.RandomState(seed)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    noisy = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype), params)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, noisy)
    nnx.update(model, state)


def assert_same_real_token_logits(ours_BTV, theirs_BTV, mask_BT, atol: float = 1e-4) -> None:
    real = mask_BT.astype(bool)
    assert np.abs(np.asarray(ours_BTV)[real] - theirs_BTV[real]).max() <= atol


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True},
        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
        {"head_dim": 24},
        {"num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    ],
    ids=["untied", "tied", "attention-bias", "tied-all-biases", "head-dim-24", "mqa-theta-500"],
)
def test_loaded_reference_checkpoint_matches_reference_logits(tmp_path, overrides):
    config = tiny_config(**overrides)
    reference = reference_model(config)
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    ids_BT, mask_BT = right_padded_batch()
    ours = forward(model, jnp.asarray(ids_BT), jnp.asarray(mask_BT))
    assert_same_real_token_logits(ours, reference_logits(reference, ids_BT, mask_BT), mask_BT)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_model_loads_in_transformers_with_same_logits(tmp_path, tied):
    config = tiny_config(tie_word_embeddings=tied, attention_bias=True)
    model = init_model(config, seed=1)
    randomise(model)
    save_pretrained(tmp_path, model, config)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids_BT, mask_BT = right_padded_batch(seed=1)
    ours = forward(model, jnp.asarray(ids_BT), jnp.asarray(mask_BT))
    assert_same_real_token_logits(ours, reference_logits(reference, ids_BT, mask_BT), mask_BT)


@pytest.mark.parametrize("torch_dtype", ["float32", "bfloat16"])
def test_round_trip_reproduces_every_tensor(tmp_path, torch_dtype):
    config = tiny_config(attention_bias=True, mlp_bias=True)
    reference_model(config).to(getattr(torch, torch_dtype)).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(tmp_path / "out", model, model.config, dtype=torch_dtype)
    original = load_file(tmp_path / "hf" / "model.safetensors")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == written.keys()
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == torch_dtype


def test_state_dict_conversion_is_an_exact_inverse():
    config = tiny_config(tie_word_embeddings=True)
    params = nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param))
    tensors = to_hf_state_dict(params, config)
    assert "lm_head.weight" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    restored = from_hf_state_dict(tensors, config)
    jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, params))


def test_sharded_checkpoint_loads(tmp_path):
    config = tiny_config()
    reference = reference_model(config)
    reference.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    assert model.embed_tokens.embedding.dtype == jnp.bfloat16
    expected = reference.model.norm.weight.detach().numpy().astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(model.norm.scale[...], expected)


def test_loading_builds_the_shape_only_model_once_per_config_and_sees_a_changed_one(tmp_path, monkeypatch):
    """Every shape-only model traces each initialiser; a load reads the layout and fills a model, and a trainer loads
    its policy, reference and initial weights from one config, so the model's shapes are built once per config."""
    from easytrain.models import hf_io

    built = []
    build = hf_io._abstract_model
    counted = lambda config, *args, **kwargs: built.append(config.num_hidden_layers) or build(config, *args, **kwargs)
    monkeypatch.setattr(hf_io, "_abstract_model", counted)
    monkeypatch.setattr(hf_io, "_SHAPE_ONLY_MODELS", {})  # none kept by earlier tests of this process
    for layers in (1, 3):
        config = tiny_config(num_hidden_layers=layers)
        save_pretrained(tmp_path / f"layers{layers}", init_model(config), config)
    built.clear()
    load_pretrained(tmp_path / "layers1")
    assert built == [1]  # the layout's float32 shapes and the loaded model: one build
    load_pretrained(tmp_path / "layers1")
    assert built == [1], "shape-only models built by a second load"
    deeper = load_pretrained(tmp_path / "layers3")
    assert len(deeper.layers) == 3 and built == [1, 3]


def test_a_load_keeps_the_dtype_objects_it_was_given_whatever_was_loaded_before(tmp_path):
    """The model's static attributes (its GraphDef: jit and reference-cache keys) hold the dtypes as given, not those
    of an earlier load of the same config that happened to pass an equal dtype written another way."""
    config = tiny_config()
    save_pretrained(tmp_path, init_model(config), config)
    load_pretrained(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32)
    model = load_pretrained(tmp_path, dtype=np.dtype("float32"), param_dtype=np.dtype("float32"))
    assert repr(model.dtype) == repr(np.dtype("float32")) == repr(model.embed_tokens.dtype)


def test_mismatched_tensors_are_all_reported():
    config = tiny_config()
    tensors = to_hf_state_dict(nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config)
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((127, 64), np.float32)
    with pytest.raises(CheckpointError) as error:
        from_hf_state_dict(tensors, config)
    message = str(error.value)
    for fragment in ("missing (1): model.norm.weight", "unexpected (1)", "q_proj.bias", "(127, 64)"):
        assert fragment in message


def test_parameters_of_another_config_are_rejected():
    params = nnx.to_pure_dict(nnx.state(init_model(tiny_config()), nnx.Param))
    with pytest.raises(CheckpointError, match="unexpected .*layers/1"):
        to_hf_state_dict(params, tiny_config(num_hidden_layers=1))


def test_buffers_and_duplicated_tied_head_are_ignored():
    config = tiny_config(tie_word_embeddings=True)
    tensors = to_hf_state_dict(nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    from_hf_state_dict(tensors, config)
    tensors["lm_head.weight"] += 1.0
    with pytest.raises(CheckpointError, match="unexpected .*lm_head.weight"):
        from_hf_state_dict(tensors, config)


def test_non_llama_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        load_pretrained(tmp_path)


def test_missing_weights_are_reported(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_tokenizer_and_params_dict_are_saved(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "hello": 1}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    config = tiny_config()
    params = nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param))
    save_pretrained(tmp_path, params, config, dtype=jnp.bfloat16, tokenizer=tokenizer)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("hello") == 1
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == ml_dtypes.bfloat16
