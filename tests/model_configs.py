"""Tiny model configurations shared by the model tests."""

import transformers

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
