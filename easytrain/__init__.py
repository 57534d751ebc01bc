"""easytrain: a subclassable, sharded, exactly-resumable trainer for JAX/Flax NNX models."""

from easytrain.arguments import TrainingArguments
from easytrain.callbacks import Callback, EarlyStopping
from easytrain.config_io import load_arguments, parse_arguments, save_arguments
from easytrain.errors import (ArgumentError, DeviceMemoryError, EasytrainError, MeshError, NonFiniteLossError,
                              OutputDirError)
from easytrain.losses import LossOutput, causal_lm_loss, token_cross_entropy_sums
from easytrain.protocol import ConfiguredDataloaders, ConfiguredFunctions, ConfiguredModel, TrainerProtocol
from easytrain.frozen import Frozen
from easytrain.metrics import Last, Max, Mean, Min, Sum, mean_over
from easytrain.state import TrainState
from easytrain.tasks.registry import register_task
from easytrain.trainers import BaseTrainer

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "BaseTrainer", "Callback", "ConfiguredDataloaders", "ConfiguredFunctions",
    "ConfiguredModel", "DeviceMemoryError", "EarlyStopping", "EasytrainError", "Frozen", "Last", "LossOutput",
    "Max", "Mean", "MeshError", "Min", "NonFiniteLossError", "OutputDirError", "Sum", "TrainState",
    "TrainerProtocol", "TrainingArguments", "causal_lm_loss", "load_arguments", "mean_over", "parse_arguments",
    "register_task", "save_arguments", "token_cross_entropy_sums",
]
