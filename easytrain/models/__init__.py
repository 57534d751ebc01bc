"""Model definitions and Hugging Face checkpoint conversion."""

from easytrain.models.hf_io import (
    CheckpointError,
    from_hf_state_dict,
    load_pretrained,
    load_pretrained as from_pretrained,
    save_pretrained,
    to_hf_state_dict,
)
from easytrain.models.llama import ConfigError, LlamaForCausalLM, UnsupportedConfigError, init_model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LlamaForCausalLM",
    "UnsupportedConfigError",
    "from_hf_state_dict",
    "from_pretrained",
    "init_model",
    "load_pretrained",
    "save_pretrained",
    "to_hf_state_dict",
]
