"""`BaseTrainer`'s `TrainerProtocol` properties (mixed into it): what a caller, callback or evaluator reads.

Each that depends on the data or the model builds the trainer on first read (`setup`), so reading one is enough to
run every check; `model` is re-pointed at the current arrays at every read.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from easytrain.arguments import TrainingArguments
from easytrain.protocol import ConfiguredDataloaders, ConfiguredFunctions
from easytrain.state import bind


class ProtocolProperties:
    """The arguments, data, module, state, shardings, compiled functions, dtypes, optimizer and schedule of a
    `BaseTrainer`."""

    @property
    def arguments(self) -> TrainingArguments:
        return self._arguments

    @property
    def dataset_train(self) -> Any:
        self.setup()
        return self._dataset_train

    @property
    def dataset_eval(self) -> Any:
        self.setup()
        return self._dataset_eval

    @property
    def model(self) -> nnx.Module:
        """The module being trained, showing the current state.

        Always the same object (the one passed as `model=`, if any), re-pointed at the current arrays
        whenever it is read and when `train()` ends, so a reference kept across training stays valid.
        """
        self.setup()
        return bind(self._model.model, self._state)

    @property
    def state(self) -> Any:
        self.setup()
        return self._state

    @property
    def state_shardings(self) -> Any:
        """`NamedSharding`s of every state leaf on the current mesh (also the checkpoint restore layout)."""
        self.setup()
        return self._model.state_shardings

    @property
    def dataloaders(self) -> ConfiguredDataloaders:
        self.setup()
        return self._data

    @property
    def functions(self) -> ConfiguredFunctions:
        self.setup()
        return self._functions

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self._arguments.dtype)

    @property
    def param_dtype(self) -> np.dtype:
        return jnp.dtype(self._arguments.param_dtype)

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return self.state.tx

    @property
    def scheduler(self) -> optax.Schedule:
        """The run's `configure_schedule(total_steps)`, which the train step applies and logs as `learning_rate`;
        `setup` settles it before `configure_model`, so a `configure_model` of one's own reads it here to build its
        optimizer with."""
        if self._schedule is None:
            self.setup()
        return self._schedule
