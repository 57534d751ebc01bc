"""Model families as configuration: where Mistral, Qwen2 and Qwen3 depart from Llama.

``features_of(config)`` reads ``config.model_type`` once and returns a few switches (biases, q/k norm,
per-layer sliding windows), so the layers never test the family themselves. Adding a family means adding
one entry to ``_FAMILIES`` (see docs/models.md).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from functools import partial

import jax
import transformers

from easytrain.errors import EasytrainError
from easytrain.models import rope as rope_math
from easytrain.models.rope import RopeScaling

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
}


class ConfigError(EasytrainError, ValueError):
    """The config cannot describe a valid model."""


class UnsupportedConfigError(ConfigError, NotImplementedError):
    """The config asks for a feature this model does not implement."""


def rope_theta(config: transformers.LlamaConfig) -> float:
    """The RoPE base, `config.rope_parameters['rope_theta']`."""
    rope = config.rope_parameters or {}
    if "rope_theta" not in rope:
        raise ConfigError("config.rope_parameters has no 'rope_theta'; set it (e.g. 10000.0).")
    return float(rope["rope_theta"])


def rope_scaling(config: transformers.LlamaConfig) -> RopeScaling | None:
    """The config's RoPE scaling (None for the default RoPE), each key its type needs checked by name."""
    rope = config.rope_parameters or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return None
    if rope_type not in rope_math.REQUIRED_KEYS:
        raise UnsupportedConfigError(
            f"config.rope_parameters['rope_type'] = {rope_type!r} is not supported; easytrain implements 'default', "
            f"{', '.join(map(repr, rope_math.REQUIRED_KEYS))} (frequencies that depend on the sequence seen, as "
            "'dynamic' and 'longrope' scale them, are not). Use a checkpoint or config with one of those."
        )
    if missing := [key for key in rope_math.REQUIRED_KEYS[rope_type] if rope.get(key) is None]:
        raise ConfigError(f"config.rope_parameters (rope_type {rope_type!r}) lacks {', '.join(missing)}; set them "
                          "as the checkpoint's model card gives them.")
    check_rope_values(rope)
    _check_full_rotation(rope_type, rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)))
    if rope_type == "yarn" and rope.get("factor") is None and not getattr(config, "max_position_embeddings", None):
        raise ConfigError("config.rope_parameters (rope_type 'yarn') has no factor, and no "
                          "config.max_position_embeddings to derive it from; set the factor.")
    keys = rope_math.REQUIRED_KEYS[rope_type] + rope_math.OPTIONAL_KEYS[rope_type]
    read = {key: rope[key] for key in keys if rope.get(key) is not None}
    if "truncate" in keys and "truncate" in rope:  # transformers tests `if truncate:`, so null does not truncate
        read["truncate"] = bool(rope["truncate"])
    derived = rope_type == "yarn" and "factor" not in read  # the only reader of the context length
    scaling = RopeScaling(rope_type, tuple(sorted(read.items())),
                          getattr(config, "max_position_embeddings", None) if derived else None)
    factor = scaling.yarn_factor() if rope_type == "yarn" else scaling.value("factor")
    if not _is_number(factor) or not factor > 0:
        raise ConfigError(f"config.rope_parameters['factor'] = {factor!r} must be a positive number.")
    if rope_type == "llama3" and not scaling.value("high_freq_factor") > scaling.value("low_freq_factor"):
        raise ConfigError(f"config.rope_parameters: high_freq_factor ({scaling.value('high_freq_factor')}) must "
                          f"exceed low_freq_factor ({scaling.value('low_freq_factor')}).")
    return scaling


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rope_values(rope: Mapping) -> None:
    """Values of the wrong type in a scaled RoPE's parameters (a hand-edited config.json: transformers only warns
    of most, or fails naming no key) refused by name, before they fail unnamed in the arithmetic. `rope`:
    `rope_parameters`, or a config.json's v4 `rope_scaling` (its `type`)."""
    rope_type = rope.get("rope_type", rope.get("type"))
    for key in rope_math.REQUIRED_KEYS.get(rope_type, ()) + rope_math.OPTIONAL_KEYS.get(rope_type, ()):
        value = rope.get(key)
        if key == "truncate" and value is not None and not isinstance(value, bool):
            raise ConfigError(f"config.rope_parameters['truncate'] = {value!r} must be true or false (or absent).")
        if key != "truncate" and value is not None and not _is_number(value):
            raise ConfigError(f"config.rope_parameters[{key!r}] = {value!r} must be a number.")


def _check_full_rotation(rope_type: str, fraction: object) -> None:
    """transformers' scaled RoPE rotates only `partial_rotary_factor` of each head, which these families' attention
    does not apply (transformers' own models fail on the shapes there); with the default RoPE both ignore it."""
    if fraction is not None and fraction != 1:
        raise UnsupportedConfigError(
            f"config.rope_parameters['partial_rotary_factor'] = {fraction!r} with rope_type {rope_type!r}: "
            "transformers' scaled RoPE then rotates only that fraction of each head, which these families' attention "
            "does not apply (transformers' own model fails on the shapes). Remove it, or set it to 1.0.")


def activation_name(config: transformers.LlamaConfig) -> str:
    """Validates ``config.hidden_act`` at construction rather than at the first forward pass."""
    if config.hidden_act not in ACTIVATIONS:
        raise UnsupportedConfigError(
            f"config.hidden_act = {config.hidden_act!r} is not supported; "
            f"choose one of {sorted(ACTIVATIONS)}."
        )
    return config.hidden_act


def attention_heads(config: transformers.PretrainedConfig) -> tuple[int, int]:
    """``(num_attention_heads, num_key_value_heads)``, checked to group: each key/value head serves a whole number
    of query heads (grouped-query attention reshapes the queries into ``kv_heads x group``)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for field, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"config.{field} = {count!r} must be a positive number of heads.")
    if heads % kv_heads:
        raise ConfigError(
            f"config.num_attention_heads ({heads}) must be a multiple of config.num_key_value_heads ({kv_heads})."
        )
    return heads, kv_heads


def head_dim_of(config: transformers.LlamaConfig) -> int:
    """Per-head width; ``config.head_dim`` may differ from hidden / heads."""
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ArchFeatures:
    """Where a family departs from Llama, resolved once so layers never test ``model_type``.

    Attributes:
        qkv_bias: Bias on the q/k/v projections.
        o_bias: Bias on the attention output projection.
        mlp_bias: Bias on the gate/up/down projections.
        qk_norm: Per-head RMSNorm on queries and keys before RoPE (Qwen3).
        windows: Per layer, the sliding-window length in tokens, or None for full causal attention.
    """

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    windows: tuple[int | None, ...]


def _layer_windows(config: transformers.PretrainedConfig) -> tuple[int | None, ...]:
    """Qwen-style ``config.layer_types``: each layer is 'full_attention' or 'sliding_attention'."""
    types = tuple(config.layer_types)
    if unknown := sorted(set(types) - {"full_attention", "sliding_attention"}):
        raise UnsupportedConfigError(
            f"config.layer_types contains {unknown}; only 'full_attention' and 'sliding_attention' "
            "are implemented."
        )
    if len(types) != config.num_hidden_layers:
        raise ConfigError(
            f"config.layer_types has {len(types)} entries for config.num_hidden_layers = "
            f"{config.num_hidden_layers}; give one type per layer."
        )
    if "sliding_attention" in types and config.sliding_window is None:
        raise ConfigError(
            "config.layer_types has 'sliding_attention' layers but config.sliding_window is None; "
            "set use_sliding_window=True and sliding_window, or make every layer 'full_attention'."
        )
    return tuple(config.sliding_window if kind == "sliding_attention" else None for kind in types)


def _llama(c: transformers.PretrainedConfig) -> ArchFeatures:
    windows = (None,) * c.num_hidden_layers
    return ArchFeatures(c.attention_bias, c.attention_bias, c.mlp_bias, qk_norm=False, windows=windows)


def _uniform_layer_types(config: transformers.PretrainedConfig) -> list[str]:
    """The ``layer_types`` that describe Mistral: its one window (or none) on every layer."""
    kind = "full_attention" if config.sliding_window is None else "sliding_attention"
    return [kind] * config.num_hidden_layers


def _check_mistral_layer_types(config: transformers.PretrainedConfig) -> None:
    """transformers' ``MistralModel`` ignores ``layer_types``, but its ``from_pretrained`` reads a 'mistral'
    config.json holding them as 'ministral', whose layers honour them: entries naming other windows than Mistral's
    one would train one model and export another."""
    types = getattr(config, "layer_types", None)
    if types is None or list(types) == (uniform := _uniform_layer_types(config)):
        return
    applies = "no window" if config.sliding_window is None else "that window"
    raise UnsupportedConfigError(
        f"config.layer_types = {list(types)} disagrees with config.sliding_window = {config.sliding_window}: a "
        f"Mistral model applies {applies} to every layer (transformers' MistralModel ignores layer_types), while "
        "transformers' from_pretrained reads a 'mistral' config.json holding layer_types as a Ministral model that "
        "honours them, so the model trained and its export would differ. Per-layer windows (Ministral) are not "
        f"implemented; remove layer_types from the config (config.json's \"layer_types\"), or set every entry to "
        f"{uniform[0]!r}."
    )


def _mistral(c: transformers.PretrainedConfig) -> ArchFeatures:
    _check_mistral_layer_types(c)
    windows = (c.sliding_window,) * c.num_hidden_layers
    return ArchFeatures(False, False, False, qk_norm=False, windows=windows)


def _qwen2(c: transformers.PretrainedConfig) -> ArchFeatures:
    return ArchFeatures(True, False, False, qk_norm=False, windows=_layer_windows(c))


def _qwen3(c: transformers.PretrainedConfig) -> ArchFeatures:
    return ArchFeatures(c.attention_bias, c.attention_bias, False, qk_norm=True, windows=_layer_windows(c))


_FAMILIES: dict[str, Callable[[transformers.PretrainedConfig], ArchFeatures]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
#: Why a config.json that says 'mistral' can arrive as 'ministral' (transformers' AutoConfig renames it).
_MINISTRAL_NOTE = {"ministral": (
    " transformers' AutoConfig.from_pretrained reads a config.json with model_type 'mistral' and layer_types as "
    "'ministral' (per-layer sliding windows, not implemented here). If every layer_types entry is "
    "'sliding_attention' (or every one 'full_attention' with sliding_window null), remove layer_types from "
    "config.json: it then loads as the same model, Mistral."
)}


def exported_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """A copy of ``config`` to write as config.json, read back by transformers as the model that was built: a
    Mistral config's ``layer_types`` (checked to agree with its one window) are left out, since transformers'
    ``from_pretrained`` would read them as a Ministral model, which easytrain cannot load."""
    exported = copy.deepcopy(config)
    if config.model_type == "mistral" and hasattr(exported, "layer_types"):  # even None: the key alone renames it
        _check_mistral_layer_types(config)
        del exported.layer_types
    return exported


def _check_training_fields(config: transformers.PretrainedConfig) -> None:
    """Refuse fields that change transformers' training forward and that this model does not implement.

    Every other field the four families' transformers code reads (biases, windows, layer types, head_dim,
    hidden_act, RoPE) is implemented or refused where it is read.
    """
    dropout = getattr(config, "attention_dropout", 0.0)
    if dropout not in (None, 0):
        raise UnsupportedConfigError(
            f"config.attention_dropout = {dropout!r} is not supported; this model applies no dropout to the "
            "attention probabilities (transformers does, in training), so training would differ. "
            "Set it to 0.0 in the config (config.json's \"attention_dropout\": 0.0)."
        )


def features_of(config: transformers.PretrainedConfig) -> ArchFeatures:
    """The architecture switches of ``config``'s family, chosen by ``config.model_type``."""
    if config.model_type not in _FAMILIES:
        raise UnsupportedConfigError(
            f"config.model_type = {config.model_type!r} is not supported; use a config of one of "
            f"{SUPPORTED_MODEL_TYPES} (docs/models.md explains how to add a family)."
            + _MINISTRAL_NOTE.get(config.model_type, "")
        )
    _check_training_fields(config)
    features = _FAMILIES[config.model_type](config)
    if any(window is not None and window < 1 for window in features.windows):
        raise ConfigError(
            f"config.sliding_window = {config.sliding_window} must be a positive number of tokens."
        )
    return features


def check_buildable(config: transformers.PretrainedConfig) -> None:
    """Every refusal the model's construction makes from ``config`` alone (family, training fields, windows,
    attention heads, RoPE, activation), run without building it: a trainer asks before it prepares any data."""
    features_of(config)
    attention_heads(config)
    rope_theta(config)
    rope_scaling(config)
    activation_name(config)
