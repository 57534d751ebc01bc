"""The model switches the training arguments set on a module before it is placed (`BaseTrainer.adapt_module`):
`remat` (`remat_policy`), `scan_layers` and `attention_implementation`.

A switch is set on the module itself when it has the attribute; otherwise on the outermost easytrain models inside it
(a Llama held by a wrapper module, as `super().create_module()` inside a custom `create_module` builds it, gets the
run's layout too). A user's own submodules are never touched: an attribute of the same name there may mean something
else. A module that takes none of these switches accepts only the argument's default: the switch would otherwise be
silently ignored, and the user would measure a run that is not the one they asked for.

`scan_layers` with a structured attention mask ('dot_product_attention', 'splash') needs one sliding window for every
layer: `check_scan_windows` refuses other configs before any data is prepared, `apply_switches` any module it adapts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from easytrain.errors import ArgumentError
from easytrain.models import splash
from easytrain.models.families import SUPPORTED_MODEL_TYPES, ArchFeatures, ConfigError, features_of


def apply_switches(module: nnx.Module, args: Any, platform: str) -> None:
    """Set the switches `args` (`TrainingArguments`) asks for on `module`, in place, for a run on `platform`."""
    for owner in _owners(module, "scan_layers"):  # before any layer is restacked
        features = getattr(owner, "features", None)  # easytrain's models only: a user's `features` is their own
        if isinstance(features, ArchFeatures) and (problem := scan_windows_problem(args, features.windows)):
            raise ArgumentError("scan_layers", problem)
    set_switch(module, "remat", args.remat_policy, "none", "remat_policy", "apply nnx.remat inside your module")
    set_switch(module, "scan_layers", args.scan_layers, False, "scan_layers", "scan over the layers inside your module")
    set_switch(module, "attention_implementation", args.attention_implementation, "xla", "attention_implementation",
               "call jax.nn.dot_product_attention inside your module")
    if args.attention_implementation == "splash":
        splash.check_backend(platform)


def check_scan_windows(args: Any, config: Any) -> None:
    """Refuse `scan_layers` with a structured attention mask on a config whose layers use different sliding windows,
    from the config alone: trainers ask before they prepare any data, not when the first step is traced."""
    if (problem := scan_windows_problem(args, config_windows(config))) is not None:
        raise ArgumentError("scan_layers", problem)


def config_windows(config: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention) of an easytrain family's config; () for any other config,
    or one the model's construction refuses itself (naming the field)."""
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return ()
    try:
        return features_of(config).windows
    except ConfigError:
        return ()


def scan_windows_problem(args: Any, windows: Sequence[int | None]) -> str | None:
    """Why `args` cannot scan layers with these `windows`, or None. 'dot_product_attention' and 'splash' take the
    window as static structure, and a scan runs one layer body for every layer, so the layers must share one window;
    'xla' masks are arrays, one picked per layer."""
    distinct = list(dict.fromkeys(windows))
    if not args.scan_layers or args.attention_implementation == "xla" or len(distinct) < 2:
        return None
    return (f"scan_layers=True with attention_implementation={args.attention_implementation!r} needs one attention "
            f"window for every layer (that implementation's window is static in the one scanned layer body), but "
            f"the model's layers use windows {distinct} (None: full attention). Use attention_implementation='xla' "
            "(its dense masks take a window per layer), or scan_layers=False.")


def set_switch(module: nnx.Module, attribute: str, value: Any, default: Any, field: str, otherwise: str) -> None:
    """`<attribute> = value` on `module`, or on the easytrain models it holds (`_owners`); a module with neither
    accepts only the argument's default."""
    owners = _owners(module, attribute)
    for owner in owners:
        setattr(owner, attribute, value)
    if not owners and value != default:
        raise ArgumentError(field, f"{type(module).__name__} has no `{attribute}` attribute to set; use "
                                   f"{default!r}, or {otherwise}.")


def _owners(module: Any, attribute: str) -> list[Any]:
    """`module` if it has `attribute`; else the outermost easytrain models (or subclasses of one) inside it that have
    it, listed before any is changed (setting `scan_layers` restacks layers, which changes the graph being walked)."""
    if hasattr(module, attribute) or not isinstance(module, nnx.Module):
        return [module] if hasattr(module, attribute) else []
    found: dict[tuple, Any] = {}
    for path, node in sorted(nnx.iter_modules(module), key=lambda item: len(item[0])):  # outermost first
        if (hasattr(node, attribute) and _is_easytrain_model(type(node))
                and not any(path[:len(owner)] == owner for owner in found)):
            found[tuple(path)] = node
    return list(found.values())


def _is_easytrain_model(cls: type) -> bool:
    """An easytrain class, or a user's subclass of one (a Llama with a value head): its switches mean easytrain's."""
    return any(base.__module__.startswith("easytrain.") for base in cls.__mro__)
