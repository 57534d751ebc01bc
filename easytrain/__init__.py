"""easytrain: a subclassable, sharded, exactly-resumable trainer for JAX/Flax NNX models.

The names below load on first use (PEP 562 `__getattr__`): `import easytrain` costs nothing, and the
`easytrain` command relaunches itself with its allocator setting (`easytrain.host_memory`) before JAX,
`transformers` and `datasets` are imported, instead of importing them twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from easytrain.hf_advice import hide_pytorch_advice

hide_pytorch_advice()  # before anything imports transformers

__version__ = "0.1.0"

#: Each module and the public names it gives the package.
_MODULES = {
    "easytrain.arguments": ("TrainingArguments",),
    "easytrain.callbacks": ("Callback", "EarlyStopping"),
    "easytrain.config_io": ("load_arguments", "parse_arguments", "save_arguments"),
    "easytrain.errors": ("ArgumentError", "DeviceMemoryError", "EasytrainError", "MeshError", "NonFiniteLossError",
                         "OutputDirError"),
    "easytrain.frozen": ("Frozen",),
    "easytrain.losses": ("LossOutput", "causal_lm_loss", "token_cross_entropy_sums"),
    "easytrain.metrics": ("Last", "Max", "Mean", "Min", "Sum", "mean_over"),
    "easytrain.protocol": ("ConfiguredDataloaders", "ConfiguredFunctions", "ConfiguredModel", "TrainerProtocol"),
    "easytrain.state": ("TrainState",),
    "easytrain.tasks.registry": ("register_task",),
    "easytrain.trainers": ("BaseTrainer",),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "ArgumentError", "BaseTrainer", "Callback", "ConfiguredDataloaders", "ConfiguredFunctions",
    "ConfiguredModel", "DeviceMemoryError", "EarlyStopping", "EasytrainError", "Frozen", "Last", "LossOutput",
    "Max", "Mean", "MeshError", "Min", "NonFiniteLossError", "OutputDirError", "Sum", "TrainState",
    "TrainerProtocol", "TrainingArguments", "causal_lm_loss", "load_arguments", "mean_over", "parse_arguments",
    "register_task", "save_arguments", "token_cross_entropy_sums",
]

if TYPE_CHECKING:  # the same names for type checkers and editors (tests/test_package.py keeps the lists equal)
    from easytrain.arguments import TrainingArguments
    from easytrain.callbacks import Callback, EarlyStopping
    from easytrain.config_io import load_arguments, parse_arguments, save_arguments
    from easytrain.errors import (ArgumentError, DeviceMemoryError, EasytrainError, MeshError, NonFiniteLossError,
                                  OutputDirError)
    from easytrain.frozen import Frozen
    from easytrain.losses import LossOutput, causal_lm_loss, token_cross_entropy_sums
    from easytrain.metrics import Last, Max, Mean, Min, Sum, mean_over
    from easytrain.protocol import ConfiguredDataloaders, ConfiguredFunctions, ConfiguredModel, TrainerProtocol
    from easytrain.state import TrainState
    from easytrain.tasks.registry import register_task
    from easytrain.trainers import BaseTrainer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'easytrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
