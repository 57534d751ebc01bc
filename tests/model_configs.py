"""Tiny model configurations shared by the model tests."""

import transformers

VOCAB = 128


def tiny_config(**overrides) -> transformers.LlamaConfig:
    """A 2-layer grouped-query Llama small enough for CPU tests; keyword overrides win."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128)
    return transformers.LlamaConfig(**(fields | overrides))
