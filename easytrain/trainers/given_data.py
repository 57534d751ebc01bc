"""Refuse data given to a trainer whose `prepare_datasets` never reads it.

`dataset_train=` / `dataset_eval=` and the language-model data arguments (`train_file`, `max_train_samples`,
...) are read by easytrain's own `prepare_datasets` (language modelling, SFT, DPO). A trainer that builds its own
rows would otherwise train on them and silently drop what it was given. Reading is recorded while
`prepare_datasets` runs: every built-in one goes through `builders.uses_embedded_data`, which calls `mark_read`;
a trainer of its own reads the given datasets with `given_datasets(self)`, or declares
`reads_given_data = True` on its class when it reads the arguments itself. `evaluation_input` checks what
`evaluate(dataset)` is given.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import datasets

from easytrain.argument_checks import field_defaults
from easytrain.arguments import TrainingArguments
from easytrain.data import sources
from easytrain.errors import ArgumentError

#: The `TrainingArguments` fields only a `prepare_datasets` reads (not `max_length`: collate or the module may).
DATA_FIELDS = ("dataset_name", "dataset_config_name", "train_file", "validation_file", "text_column",
               "validation_split_percentage", "max_train_samples", "max_eval_samples", "preprocessing_num_workers")
_reads: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("easytrain_given_data_reads", default=None)


def mark_read() -> None:
    """Record that the running `prepare_datasets` reads the given datasets and data arguments."""
    if (reads := _reads.get()) is not None:
        reads.append(True)


def given_datasets(trainer: Any) -> tuple[Any, Any]:
    """`(dataset_train, dataset_eval)` as given to the trainer's constructor (None where not given), marked read:
    for a `prepare_datasets` of its own that uses them."""
    mark_read()
    return trainer._raw_train, trainer._raw_eval


@contextlib.contextmanager
def tracking() -> Iterator[list[bool]]:
    """Collect `mark_read` calls made inside the block (a `prepare_datasets` call)."""
    token = _reads.set(reads := [])
    try:
        yield reads
    finally:
        _reads.reset(token)


def given_items(trainer: Any) -> list[str]:
    """The constructor datasets given and the data arguments set to other than their defaults."""
    args = trainer.arguments
    defaults = field_defaults(TrainingArguments)
    names = [name for name, rows in (("dataset_train", trainer._raw_train), ("dataset_eval", trainer._raw_eval))
             if rows is not None]
    return names + [name for name in DATA_FIELDS if getattr(args, name) != defaults[name]]


def check_read(trainer: Any, read: bool) -> None:
    """Raise `ArgumentError` naming what was given but not read by this trainer's `prepare_datasets`."""
    if read or getattr(trainer, "reads_given_data", False):
        return
    unread = given_items(trainer)
    if not unread:
        return
    listed = unread[0] if len(unread) == 1 else f"{', '.join(unread[:-1])} and {unread[-1]}"
    raise ArgumentError(unread[0], f"{type(trainer).__name__}'s prepare_datasets builds its own rows: {listed} "
                                   f"would be ignored. Drop {'it' if len(unread) == 1 else 'them'}, or make "
                                   "prepare_datasets read them: `given_datasets(self)` (easytrain.trainers.given_data) "
                                   "returns dataset_train and dataset_eval, super().prepare_datasets() applies the "
                                   "language-model data arguments, and a class that reads the arguments itself "
                                   "declares `reads_given_data = True` (docs/custom_trainer.md).")


def evaluation_input(dataset: Any) -> Any:
    """What `evaluate(dataset)` hands the trainer's `prepare_eval_dataset`: a `datasets.Dataset` read as plain rows,
    and other rows (a list, a dict of columns) as given, for a hook of one's own to make rows of; a set of splits or
    a stream, which no hook can batch, is refused naming the fix (`sources.evaluation_examples`)."""
    if isinstance(dataset, (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset,
                            datasets.IterableDatasetDict)):
        return sources.evaluation_examples(dataset)
    return dataset
