"""Named architectures for training from scratch (`--model_config tiny`)."""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from huggingface_hub.errors import StrictDataclassError

from easytrain.errors import ArgumentError
from easytrain.models.families import SUPPORTED_MODEL_TYPES

PRESETS: dict[str, dict] = {
    # About 0.3M parameters: with the default arguments it reaches 99% exact match on held-out
    # additions of the embedded arithmetic task in about three minutes on 2 CPU cores.
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    # The throughput anchor of the benchmarks (6.3M parameters at vocab 4096).
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=2048),
}


def llama_config(name_or_path: str, *, vocab_size: int, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> transformers.PretrainedConfig:
    """A preset (Llama) or a config.json of any supported family, sized to the tokenizer's vocabulary, with the
    tokenizer's bos/eos/pad ids wherever the file does not set them (else the export would name no EOS)."""
    specials = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if name_or_path in PRESETS:
        return transformers.LlamaConfig(vocab_size=vocab_size, **PRESETS[name_or_path], **specials)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ArgumentError("model_config", f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                                            "nor an existing config.json; pass one of those.")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArgumentError("model_config", f"{path} is not valid JSON ({error}); fix the file, or pass a preset "
                                            f"({', '.join(PRESETS)}).") from error
    if not isinstance(values, dict):
        raise ArgumentError("model_config", f"{path} holds a JSON {type(values).__name__}, not an object of config "
                                            "fields; write it as {\"hidden_size\": ..., ...}.")
    model_type = values.pop("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ArgumentError("model_config", f"{path} has model_type {model_type!r}; supported: "
                                            f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    values.setdefault("vocab_size", vocab_size)
    for name, value in specials.items():  # the tokenizer's ids where the file leaves them unset, as a preset gets
        if values.get(name) is None:
            values[name] = value
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError, StrictDataclassError) as error:  # transformers' own validation of the fields
        cause = error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ else error
        raise ArgumentError("model_config", f"{path} does not describe a valid {model_type} model: "
                                            f"{str(cause).strip().rstrip('.')}; fix the file.") from error
