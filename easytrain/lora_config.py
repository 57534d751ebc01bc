"""`LoRAConfig`: what LoRA adapts and how, checked before anything is built (PEFT's field meanings)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from easytrain.argument_checks import field_defaults
from easytrain.errors import ArgumentError, EasytrainError

#: The attention and MLP projections: on these models the same layers as PEFT's ``"all-linear"``.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: How ``lora_a`` starts: PEFT's ``init_lora_weights=True`` (``"kaiming_uniform"``) or ``"gaussian"``.
INIT_A_CHOICES = ("kaiming_uniform", "gaussian")
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
#: PEFT's shorthand for every linear layer but the output head.
ALL_LINEAR = "all-linear"


class LoRAConfigError(ArgumentError):
    """A ``LoRAConfig`` field has a bad value; ``field`` names it."""


class LoRAError(EasytrainError, ValueError):
    """A model cannot take (or give up) adapters as asked."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    Args:
        rank: Inner dimension ``r`` of each adapter (> 0).
        alpha: Adapter output is scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``), as PEFT.
        dropout: Dropout probability on the adapters' input, in [0, 1); active in train mode only.
        target_modules: Module names (a module is adapted when its Hugging Face name equals one or ends
            with ``"." + name``), or one regular expression that must match a whole name (e.g.
            ``r"model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj"``), exactly PEFT's rule; ``"all-linear"``:
            every dense layer but ``lm_head``, as in PEFT. Names are Hugging Face's:
            ``model.layers.0.mlp.down_proj``, ``lm_head``. Only dense (linear) layers take adapters.
        train_embeddings: Also train the full input embedding and the output head (``embed_tokens``,
            ``lm_head``; PEFT's ``modules_to_save``), e.g. after adding tokens. A head trained in full takes no
            adapter even when ``target_modules`` names it: PEFT skips a target that ``modules_to_save`` names.
        train_norms: Also train every RMSNorm scale.
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(rank)`` (PEFT's ``use_rslora``).
        init_a: ``"kaiming_uniform"`` (PEFT's default) or ``"gaussian"`` (normal, std ``1 / rank``).
        param_dtype: Storage dtype of the adapters; default float32 (PEFT's ``autocast_adapter_dtype``
            keeps adapters in float32 under a bfloat16 base); None: the dtype of the kernel they adapt.
        strict_targets: A listed name that matches no dense layer is an error (names a user writes); False skips it
            with an info log, as PEFT loads an adapter (``read_peft_config`` gives False). Not compared: two configs
            that adapt the same layers are equal.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES
    train_embeddings: bool = False
    train_norms: bool = False
    use_rslora: bool = False
    init_a: str = "kaiming_uniform"
    param_dtype: str | None = "float32"
    strict_targets: bool = dataclasses.field(default=True, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise LoRAConfigError("rank", f"must be a positive integer (the adapters' inner dimension), "
                                          f"got {self.rank!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(
                self.alpha) or self.alpha <= 0:
            raise LoRAConfigError("alpha", f"must be a positive number (scaling = alpha / rank), got {self.alpha!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LoRAConfigError("dropout", f"must be a probability in [0, 1), got {self.dropout!r}.")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", _checked_targets(self.target_modules))
        if self.init_a not in INIT_A_CHOICES:
            raise LoRAConfigError("init_a", f"must be one of {INIT_A_CHOICES}, got {self.init_a!r}.")
        if self.param_dtype is not None:
            try:
                dtype = jnp.dtype(self.param_dtype)
            except TypeError as error:
                raise LoRAConfigError("param_dtype", f"{self.param_dtype!r} is not a dtype ({error}).") from None
            if not jnp.issubdtype(dtype, jnp.floating):
                raise LoRAConfigError("param_dtype", f"must be a floating dtype such as 'float32' or "
                                                     f"'bfloat16', got {self.param_dtype!r}.")

    @property
    def scaling(self) -> float:
        """Factor applied to ``x @ lora_a @ lora_b``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _checked_targets(targets: Any) -> tuple[str, ...] | str:
    if isinstance(targets, str):
        if not targets:
            raise LoRAConfigError("target_modules", "is an empty string; pass module names such as "
                                                    "['q_proj', 'v_proj'] or a regular expression.")
        try:
            re.compile(targets)
        except re.error as error:
            raise LoRAConfigError("target_modules", f"{targets!r} is not a valid regular expression ({error}).") \
                from None
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)) or not targets:
        raise LoRAConfigError("target_modules", f"must be a non-empty list of module names or one regular "
                                                f"expression, got {targets!r}.")
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise LoRAConfigError("target_modules", f"names must be non-empty strings, got {bad!r}.")
    ordered = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
    return tuple(dict.fromkeys(ordered))


#: The prefix that marks a regular expression among command-line ``lora_target_modules`` values.
REGEX_PREFIX = "re:"


def targets_from_arguments(values: Sequence[str] | str) -> Sequence[str] | str:
    """``lora_target_modules`` as ``LoRAConfig.target_modules``: a plain string (YAML/JSON, as in PEFT) or one
    ``"re:PATTERN"`` value is a regular expression; ``["all-linear"]`` is PEFT's shorthand; else names, each
    value split at commas (``q_proj,v_proj``, as PEFT's command lines take them: no layer name holds a comma). A plain
    string may carry the ``re:`` prefix too (no module name holds a colon)."""
    if isinstance(values, str):
        return values.removeprefix(REGEX_PREFIX)
    values = list(values)
    if len(values) == 1 and (values[0] == ALL_LINEAR or values[0].startswith(REGEX_PREFIX)):
        return values[0].removeprefix(REGEX_PREFIX)
    if bad := [v for v in values if v.startswith(REGEX_PREFIX)]:
        raise LoRAConfigError("lora_target_modules", f"{bad}: a regular expression ('re:PATTERN') must be the "
                                                     "only value; join alternatives inside it with '|'.")
    names = [name.strip() for value in values for name in value.split(",")]
    return [name for name in names if name] or values


def from_arguments(args: Any) -> LoRAConfig | None:
    """The ``LoRAConfig`` a run's ``lora_*`` arguments describe, or None when ``lora_rank`` is 0.

    Raises:
        LoRAConfigError: naming the ``lora_*`` argument (``lora_rank``, ``lora_target_modules``, ...).
    """
    if not args.lora_rank:
        return None
    try:
        return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          target_modules=targets_from_arguments(args.lora_target_modules),
                          train_embeddings=args.lora_train_embeddings, train_norms=args.lora_train_norms,
                          use_rslora=args.lora_use_rslora)
    except LoRAConfigError as error:
        raise as_argument_error(error) from None


def as_argument_error(error: LoRAConfigError) -> LoRAConfigError:
    """The same error naming the command-line argument (``target_modules`` -> ``lora_target_modules``)."""
    if error.field.startswith("lora_"):
        return error
    return LoRAConfigError(f"lora_{error.field}", error.message)


#: The `lora_*` arguments that mean something only when LoRA runs (`lora_rank` > 0 or `lora_adapter_path`).
LORA_ONLY_FIELDS = ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_train_embeddings", "lora_train_norms",
                    "lora_use_rslora", "lora_export")


def check_lora_fields_apply(args: Any) -> None:
    """Refuse `lora_*` settings given (off their defaults) while `lora_rank` is 0 and no `lora_adapter_path` is set:
    the run would fine-tune every weight and ignore them without a word. A resume is left to the comparison with its
    checkpoint (`lora_record.lora_changes`): a full fine-tuning run saved before this check kept such a field in
    its arguments.json, and a LoRA run resumed without lora_rank is told to restore lora_rank, not to drop the rest."""
    if args.lora_rank or args.lora_adapter_path or args.resume_from_checkpoint:
        return
    defaults = field_defaults(args)
    given = {name: getattr(args, name) for name in LORA_ONLY_FIELDS if getattr(args, name) != defaults[name]}
    if given:
        raise unused_lora_fields_error(given, "set lora_rank (e.g. --lora_rank 16) to train LoRA adapters, or drop "
                                              f"{', '.join('--' + name for name in given)} to train every weight.")


def unused_lora_fields_error(given: dict[str, Any], fix: str) -> ArgumentError:
    """The refusal of `given` (name -> value) `lora_*` settings that full fine-tuning would ignore, naming the first."""
    shown = ", ".join(f"{name}={value!r}" for name, value in given.items())
    return ArgumentError(next(iter(given)), f"{shown} given, but lora_rank is 0 (full fine-tuning), so "
                                            f"{'it has' if len(given) == 1 else 'they have'} no effect: {fix}")
