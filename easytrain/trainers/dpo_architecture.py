"""What a DPO reference computes with besides its weights: its architecture. The same weights under another
config.json (RoPE theta, norm epsilon, attention windows) give other log-probs, which weight digests cannot show.

`architecture_key` is the part of the precomputed log-probs' cache key that names it: the static (non-array)
attributes of the reference's graph definition, which hold every number the model derives from its config and its
kernel switches (`attention_implementation`), and the config's architecture keys. `config_architecture` is what a
fixed reference's resume record keeps (`ARCHITECTURE`), compared on resume by `architecture_changes`: only the
config's, since the switches follow the policy's arguments, which a resume may change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from flax import nnx
from flax.nnx.graphlib import Static

from easytrain.trainers.resume_checks import ARCHITECTURE_KEYS, architecture_differences, config_dict

#: Key of the config's architecture in a fixed reference's run_info record (`REFERENCE_WEIGHTS`).
ARCHITECTURE = "architecture"
#: Static attributes that change no log-prob: the config object itself (its path and version stamp; the numbers the
#: model reads from it are its other attributes, and `config_architecture` adds its keys), the generation config,
#: NNX's own bookkeeping of which attributes are nodes, and rematerialisation (a forward pass is the same with it).
_LEFT_OUT = frozenset({"_config", "_source_generation_config", "_pytree__nodes", "remat"})


def config_architecture(module: Any) -> dict[str, Any] | None:
    """The keys of `module.config` that decide what it computes (`resume_checks.ARCHITECTURE_KEYS`, as the policy's
    config is compared on resume); None for a module without a Hugging Face config."""
    config = config_dict(getattr(module, "config", None))
    return None if config is None else {key: config[key] for key in ARCHITECTURE_KEYS if key in config}


def architecture_changes(stored: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> list[str]:
    """`key: checkpoint X vs now Y` for each key both records hold with other values (`resume_checks`' comparison of
    the policy's config); a record written before the architecture was kept (None) is not compared."""
    return architecture_differences(dict(stored or {}), dict(now or {}))


def architecture_key(graphdef: nnx.GraphDef, module: Any) -> str:
    """A short digest of what a reference of `graphdef` (and `module`'s config) computes besides its weights: the
    same for the same model in any process or directory."""
    statics = [[name, _canonical(attribute.value)] for name, attribute in graphdef.attributes
               if isinstance(attribute, Static) and name not in _LEFT_OUT]
    types = [_qualified(node.type) for node in graphdef.nodes if isinstance(getattr(node, "type", None), type)]
    payload = json.dumps({"statics": statics, "types": types, "config": config_architecture(module)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _canonical(value: Any) -> Any:
    """`value` as JSON that names it the same way in every process: classes and functions by name, dataclasses by
    their compared fields, anything else by its repr unless that holds a memory address (then by its type)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_canonical(item) for item in value]
    if isinstance(value, Mapping):
        return [[str(key), _canonical(item)] for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))]
    if isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
        return _qualified(value)
    if dataclasses.is_dataclass(value):
        return [_qualified(type(value)), [[field.name, _canonical(getattr(value, field.name))]
                                          for field in dataclasses.fields(value) if field.compare]]
    text = repr(value)
    return _qualified(type(value)) if " at 0x" in text else text


def _qualified(kind: Any) -> str:
    return f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', repr(kind))}"
