"""`TrainerProtocol`: what every easytrain trainer has, and the small tuples its hooks return.

Anything that implements these members can be driven by the `easytrain train` command, whether it
subclasses `BaseTrainer` or not.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, runtime_checkable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from easytrain.arguments import TrainingArguments


class ConfiguredModel(NamedTuple):
    """Returned by `configure_model`: the module, its sharded train state and where it lives."""

    model: nnx.Module
    state: Any  # easytrain.TrainState
    state_shardings: Any
    mesh: Mesh


class ConfiguredDataloaders(NamedTuple):
    """Returned by `configure_dataloaders`: resumable train batches and the eval set."""

    train: Any  # easytrain.data.TrainBatches
    eval: Optional[Any]  # a row-access source for easytrain.data.eval_batches, or None
    steps_per_epoch: int
    total_steps: int


class ConfiguredFunctions(NamedTuple):
    """Returned by `configure_functions`: compiled `(state, batch) -> (state, metrics)` and eval step."""

    train_step: Callable[[Any, Mapping[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]
    eval_step: Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]


@runtime_checkable
class TrainerProtocol(Protocol):
    """The public surface of a trainer. `BaseTrainer` implements it; so may any class of yours."""

    @property
    def arguments(self) -> TrainingArguments: ...

    @property
    def dataset_train(self) -> Any: ...

    @property
    def dataset_eval(self) -> Any: ...

    @property
    def model(self) -> nnx.Module: ...

    @property
    def state(self) -> Any: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def param_dtype(self) -> np.dtype: ...

    @property
    def optimizer(self) -> optax.GradientTransformation: ...

    @property
    def scheduler(self) -> optax.Schedule: ...

    def configure_model(self) -> ConfiguredModel: ...

    def configure_dataloaders(self) -> ConfiguredDataloaders: ...

    def configure_functions(self) -> ConfiguredFunctions: ...

    def train(self) -> Mapping[str, float]: ...

    def evaluate(self) -> Mapping[str, float]: ...

    def save_pretrained(self, directory: str) -> Any: ...
