"""A long run keeps nothing behind, step after step: no device arrays and no Python objects pile up over training
steps, and no device arrays over evaluations and asynchronous checkpoints. What a run keeps by mistake is memory
that grows until it runs out hours in, and often a step time that creeps up with it. (Step time itself is
measured by `benchmarks/drift.py`, never asserted here.)"""

import gc

import jax
import pytest

from easytrain import BaseTrainer, Callback, TrainingArguments


class Holdings(Callback):
    """At the logs of `steps`, once any checkpoint in flight is written: the live device arrays (count, bytes) and
    the Python objects of this process, after a garbage collection. Only there: a collection in a test process
    that holds a million objects takes about a second."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps
        self.at: dict[int, tuple[int, int, int]] = {}

    def on_log(self, trainer, step, logs):
        if step not in self.steps:
            return
        trainer.loop.manager.wait_until_finished()
        gc.collect()
        arrays = jax.live_arrays()
        self.at[step] = (len(arrays), sum(array.nbytes for array in arrays), len(gc.get_objects()))


def train(tmp_path, every: int | None, max_steps: int, logging_steps: int, samples: tuple[int, ...]) -> Holdings:
    """The embedded default model on a small arithmetic set, sampled at the logs of `samples`; with `every`, an
    evaluation and an asynchronous checkpoint every `every` steps (the newest two kept)."""
    cycles = {"eval_strategy": "steps", "eval_steps": every, "save_strategy": "steps", "save_steps": every,
              "save_total_limit": 2, "async_checkpointing": True} if every else {"eval_strategy": "no",
                                                                                 "save_strategy": "no"}
    holdings = Holdings(samples)
    args = TrainingArguments(output_dir=str(tmp_path), max_length=32, train_batch_size=8, max_steps=max_steps,
                             logging_steps=logging_steps, report_to=["none"], disable_progress_bar=True,
                             save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=8, **cycles)
    BaseTrainer(args, callbacks=[holdings]).train()
    return holdings


@pytest.mark.usefixtures("collections_of_this_test")  # its gc.collect calls: this test's objects
def test_training_steps_keep_no_device_arrays_and_no_python_objects(tmp_path):
    # 8 steps an epoch: the 55 steps between the two samples cross seven epoch boundaries.
    held = train(tmp_path, every=None, max_steps=80, logging_steps=5, samples=(20, 75))
    (arrays, nbytes, objects), (arrays_later, nbytes_later, objects_later) = held.at[20], held.at[75]
    assert (arrays_later, nbytes_later) == (arrays, nbytes)
    # One object kept per step would be 55; the margin is for other tests' threads in the same process.
    assert objects_later - objects < 25, f"{objects_later - objects} more Python objects after 55 more steps"


@pytest.mark.usefixtures("collections_of_this_test")  # its gc.collect calls: this test's objects
def test_evaluations_and_async_checkpoints_keep_no_device_arrays(tmp_path):
    # Each sample is taken 2 steps after an evaluation and a save, with the save written: after two cycles and
    # after five. (Python objects are not compared here: grain and orbax keep a few small records per iterator
    # and per checkpoint path in registries of their own, about 30 objects a cycle.)
    held = train(tmp_path, every=4, max_steps=24, logging_steps=2, samples=(10, 22))
    assert held.at[22][:2] == held.at[10][:2]
