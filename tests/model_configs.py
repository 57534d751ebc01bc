"""Tiny model configurations and the forward/reference helpers shared by the model tests."""

import jax
import numpy as np
import transformers
from flax import nnx

VOCAB = 128


def tiny_config(**overrides) -> transformers.LlamaConfig:
    """A 2-layer grouped-query Llama small enough for CPU tests; keyword overrides win."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128)
    return transformers.LlamaConfig(**(fields | overrides))


# Family switches the tests must exercise: head_dim != hidden / heads, and sliding windows
# shorter than the 12-token test rows (Qwen2: layer 1 only; Qwen3: layer 0 only, via layer_types).
FAMILY_FIELDS = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "mistral": dict(head_dim=24, sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "qwen3": dict(head_dim=24, attention_bias=True, use_sliding_window=True, sliding_window=5,
                  layer_types=["sliding_attention", "full_attention"]),
}


def family_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny config of ``model_type`` with that family's distinguishing switches on."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128)
    return transformers.AutoConfig.for_model(model_type, **(fields | FAMILY_FIELDS[model_type] | overrides))


def right_padded_batch(seed: int = 0, lengths: tuple[int, ...] = (12, 7, 3)) -> tuple[np.ndarray, np.ndarray]:
    """Random ids ``[len(lengths), max(lengths)]`` and a mask with each row's real tokens first."""
    ids_BT = np.random.RandomState(seed).randint(0, VOCAB, (len(lengths), max(lengths)))
    mask_BT = (np.arange(max(lengths))[None, :] < np.asarray(lengths)[:, None]).astype(ids_BT.dtype)
    return ids_BT, mask_BT


@nnx.jit
def forward(model, ids_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """easytrain logits with a padding mask."""
    return model(ids_BT, attention_mask_BT=mask_BT)


def reference_logits(model, ids_BT: np.ndarray, mask_BT: np.ndarray) -> np.ndarray:
    """The PyTorch transformers model's float32 logits on the same batch."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids_BT), attention_mask=torch.tensor(mask_BT)).logits.float().numpy()
