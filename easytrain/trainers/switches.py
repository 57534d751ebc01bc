"""The model switches the training arguments set on a module before it is placed (`BaseTrainer.adapt_module`):
`remat` (`remat_policy`), `scan_layers` and `attention_implementation`.

Each is set on every submodule that has the attribute (a Llama held by a wrapper module, as `super().create_module()`
inside a custom `create_module` builds it, gets the run's layout too). A module none of whose submodules has one of
these attributes accepts only the argument's default: the switch would otherwise be silently ignored, and the user
would measure a run that is not the one they asked for.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from easytrain.errors import ArgumentError
from easytrain.models import splash


def apply_switches(module: nnx.Module, args: Any, platform: str) -> None:
    """Set the switches `args` (`TrainingArguments`) asks for on `module`, in place, for a run on `platform`."""
    set_switch(module, "remat", args.remat_policy, "none", "remat_policy", "apply nnx.remat inside your module")
    set_switch(module, "scan_layers", args.scan_layers, False, "scan_layers", "scan over the layers inside your module")
    set_switch(module, "attention_implementation", args.attention_implementation, "xla", "attention_implementation",
               "call jax.nn.dot_product_attention inside your module")
    if args.attention_implementation == "splash":
        splash.check_backend(platform)


def set_switch(module: nnx.Module, attribute: str, value: Any, default: Any, field: str, otherwise: str) -> None:
    """`<attribute> = value` on every submodule of `module` (itself included) that has the attribute; a module
    without any such submodule accepts only the argument's default."""
    owners = _owners(module, attribute)
    for owner in owners:
        setattr(owner, attribute, value)
    if not owners and value != default:
        raise ArgumentError(field, f"{type(module).__name__} has no `{attribute}` attribute to set; use "
                                   f"{default!r}, or {otherwise}.")


def _owners(module: Any, attribute: str) -> list[Any]:
    """The submodules of `module` (itself included) that have `attribute`, listed before any is changed (setting
    `scan_layers` restacks layers, which changes the graph being walked)."""
    if not isinstance(module, nnx.Module):
        return [module] if hasattr(module, attribute) else []
    return [node for _, node in nnx.iter_modules(module) if hasattr(node, attribute)]
