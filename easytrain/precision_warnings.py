"""The warning `validate` gives for bfloat16 master weights (`param_dtype`): an update smaller than bfloat16 can
represent, and the optimizer state kept in the parameters' dtype, lose what float32 storage keeps. A warning, once
per process for the same settings (a rerun's copy of the arguments is checked again); `argument_settings` runs it."""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger("easytrain")
#: The `lora_train_*` switches that train a part of the model in full (its parameters' dtype), and that part.
_LORA_FULLY_TRAINED = {"lora_train_embeddings": "the input embedding and the output head",
                       "lora_train_norms": "the norm scales"}


def warn_low_precision_state(args: Any) -> None:
    """bfloat16 master weights (`param_dtype`): what float32 storage keeps and they lose, warned about once per
    process for the same settings (every optimizer here keeps its state in the parameters' dtype). Under LoRA the
    adapters and their state are float32 and the bfloat16 base is frozen: warned only for what the `lora_train_*`
    switches train in full, in bfloat16."""
    if args.param_dtype != "bfloat16":
        return
    if not (args.lora_rank or args.lora_adapter_path):
        warn_bfloat16_state(args.optimizer, args.adam_beta1, args.adam_beta2, args.sgd_momentum)
    elif trained := tuple(field for field in _LORA_FULLY_TRAINED if getattr(args, field)):
        warn_bfloat16_state(args.optimizer, args.adam_beta1, args.adam_beta2, args.sgd_momentum, trained)


def _bfloat16(value: float) -> float:
    import ml_dtypes  # a dependency of jax

    return float(ml_dtypes.bfloat16(value))


#: What each optimizer keeps in the parameters' dtype (optax and `easytrain.adafactor` build it like the params).
_STATE_KEPT = {"adamw": "its first and second moments", "lion": "its momentum", "sgd": "its momentum",
               "adafactor": "its factored second-moment statistics"}


@functools.cache
def warn_bfloat16_state(optimizer: str, beta1: float, beta2: float, momentum: float,
                        lora_trained: tuple[str, ...] = ()) -> None:
    """The warning itself, once per process for the same settings: what is lost, and the fix; under LoRA
    (`lora_trained`: the `lora_train_*` switches on) for what those switches train in bfloat16 only."""
    kept = ""
    if optimizer in _STATE_KEPT and (optimizer != "sgd" or momentum):
        rounded = [f"{name}={value!r} is {_bfloat16(value)!r}" for name, value in (("adam_beta1", beta1),
                   ("adam_beta2", beta2)) if optimizer in ("adamw", "lion") and _bfloat16(value) != value]
        decays = {"adamw": "the second moment", "lion": "the momentum"}.get(optimizer)
        never = f", so {decays} never decays" if decays and _bfloat16(beta2) == 1.0 else ""
        kept = f"; optimizer={optimizer!r} keeps {_STATE_KEPT[optimizer]} in bfloat16 too" + (
            f" ({', '.join(rounded)} there{never})" if rounded else "")
    if lora_trained:
        logger.warning("param_dtype='bfloat16' with LoRA: the adapters and their optimizer state are float32, but %s "
                       "(%s) are trained in full in bfloat16 (8 significant bits): an update smaller than 1/512 to "
                       "1/256 of a weight's magnitude is rounded away%s. Pass --param_dtype float32 to train them in "
                       "float32 (the frozen base then takes twice the memory), or drop %s.",
                       " and ".join(_LORA_FULLY_TRAINED[field] for field in lora_trained), ", ".join(lora_trained),
                       kept, " and ".join(f"--{field}" for field in lora_trained))
        return
    logger.warning("param_dtype='bfloat16' stores the master weights in bfloat16 (8 significant bits): an update "
                   "smaller than 1/512 to 1/256 of a weight's magnitude is rounded away, so at a small learning_rate "
                   "most weights never change%s. Pass --param_dtype float32 to keep float32 master weights and "
                   "optimizer state (--dtype bfloat16 still computes in bfloat16).", kept)
