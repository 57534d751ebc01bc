"""Model definitions and Hugging Face checkpoint conversion."""

from easytrain.models.families import SUPPORTED_MODEL_TYPES, ConfigError, UnsupportedConfigError
from easytrain.models.hf_export import save_pretrained
from easytrain.models.hf_io import CheckpointError, from_hf_state_dict, to_hf_state_dict
from easytrain.models.hf_load import from_pretrained, load_pretrained
from easytrain.models.llama import LlamaForCausalLM, init_model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LlamaForCausalLM",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedConfigError",
    "from_hf_state_dict",
    "from_pretrained",
    "init_model",
    "load_pretrained",
    "save_pretrained",
    "to_hf_state_dict",
]
