"""`TrainerProtocol`: what every easytrain trainer has, and the small tuples its hooks return.

Anything that implements these members can be driven by the `easytrain train` command, whether it
subclasses `BaseTrainer` or not. Check that with `check_implements(trainer)`, not `isinstance`: on
Python 3.11 `isinstance` against a runtime-checkable Protocol evaluates every property, and
`BaseTrainer`'s properties load the data, build the model and compile.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Mapping, NamedTuple, Optional, Protocol, runtime_checkable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError


class ConfiguredModel(NamedTuple):
    """Returned by `configure_model`: the module, its sharded train state and where it lives."""

    model: nnx.Module
    state: Any  # easytrain.TrainState
    state_shardings: Any
    mesh: Mesh


class ConfiguredDataloaders(NamedTuple):
    """Returned by `configure_dataloaders`: resumable train batches and the eval set."""

    train: Any  # easytrain.data.TrainBatches
    eval: Optional[Any]  # easytrain.data.EvalBatches (re-iterable: one pass per iter()), or None
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


_ABSENT = object()


def protocol_members(protocol: type = TrainerProtocol) -> list[str]:
    """The public members `protocol` declares, read from the class so the list never drifts from it."""
    names: set[str] = set()
    for base in protocol.__mro__:
        if base not in (Protocol, Generic, object):
            names.update(vars(base), vars(base).get("__annotations__", {}))
    return sorted(name for name in names if not name.startswith("_"))


def missing_members(obj: Any, protocol: type = TrainerProtocol) -> list[str]:
    """Members of `protocol` that `obj` lacks, found without running any of obj's code.

    `inspect.getattr_static` sees instance and class attributes (properties unevaluated), not names
    a `__getattr__` would make up. As with `isinstance`, a method member set to None counts as missing.
    """
    missing = []
    for name in protocol_members(protocol):
        value = inspect.getattr_static(obj, name, _ABSENT)
        if value is _ABSENT or (value is None and callable(getattr(protocol, name, None))):
            missing.append(name)
    return missing


def check_implements(obj: Any) -> None:
    """Refuse a `--task` class that lacks members of `TrainerProtocol`, naming each one."""
    if missing := missing_members(obj):
        raise ArgumentError("task", f"{type(obj).__name__} does not implement easytrain.TrainerProtocol: it lacks "
                                    f"{', '.join(missing)}. Add them, or subclass easytrain.BaseTrainer.")
