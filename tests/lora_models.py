"""Tiny transformers bases with every tensor randomised, and the helpers the LoRA tests compare logits with."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from easytrain import lora

VOCAB = 128
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
             attention_bias=True)
QWEN3_TIED = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
                  tie_word_embeddings=True)


def ids_batch(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (2, 10))


def write_base(directory: Path, fields: dict, seed: int = 0) -> Path:
    """A transformers model with every tensor (norms and biases too) randomised, saved as safetensors."""
    torch = pytest.importorskip("torch")
    fields = dict(fields)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


def torch_model(directory: Path):
    import torch

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def logits(model, ids: np.ndarray) -> np.ndarray:
    model.eval()
    return np.asarray(model(jnp.asarray(ids)))


def randomise_adapters(model, seed: int = 0, scale: float = 0.2) -> None:
    """Gives every lora_a and lora_b random values, so a wrong transpose or scaling shows."""
    rng = np.random.RandomState(seed)
    for module in lora.lora_modules(model).values():
        for variable in (module.lora_a, module.lora_b):
            old = variable.get_value()
            new = jnp.asarray(scale * rng.standard_normal(variable.shape), old.dtype)
            variable.set_value(jax.device_put(new, old.sharding) if lora._placed_sharding(old) else new)
