"""The train step's memory plan (`easytrain.memory_plan`): compiled ahead of the first step, which reuses that
executable; logged with the first record; a step that cannot fit refused before it runs, its checkpoint kept;
and the benchmark Llama's plan recorded, so a change that grows it (or stops donating the state) fails here."""

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import jax
import numpy as np
import pytest
import transformers

from benchmarks.overhead import BATCH, CONFIG, LENGTH
from easytrain import BaseTrainer, DeviceMemoryError, TrainingArguments, memory_plan
from easytrain.checkpoint import CHECKPOINTS_DIRNAME, CheckpointManager
from easytrain.memory_plan import MIB, Headroom
from easytrain.models import init_model
from easytrain.tasks import build_arithmetic_tokenizer
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.sft import SFTTrainer

#: The benchmark Llama's train step (6.3M parameters, batch 8 x 256, AdamW, float32, one device): temporaries
#: per device as XLA:CPU planned them with jax 0.10.2 (the same under --xla_cpu_max_isa=AVX2). Activations
#: kept for the backward pass, gradients, the optimizer's scratch. Update it when a change shrinks them (SwiGLU's
#: own backward, 2026-12-04: 353.94 -> 322.44).
REFERENCE_TEMP_MIB = 322.44


def tiny_args(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=32, train_batch_size=8, max_steps=2, logging_steps=1,
                  eval_strategy="no", save_strategy="no", report_to=["jsonl"], disable_progress_bar=True,
                  save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=16)
    return TrainingArguments(**{**values, **overrides})


def device_bytes(tree) -> int:
    """Bytes of `tree`'s arrays on one device (every leaf is whole on the one CPU device)."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def first_batch(trainer: BaseTrainer) -> dict[str, jax.Array]:
    iterator = trainer.dataloaders.train.iterator(0)
    try:
        return trainer.to_global(next(iterator))
    finally:
        iterator.close()


def records(output_dir: str) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("split") == "train"]


def test_the_step_compiled_ahead_is_the_one_that_runs_and_its_plan_is_logged_once(tmp_path, caplog):
    trainer = BaseTrainer(tiny_args(tmp_path, max_steps=3))
    batch_bytes = device_bytes(first_batch(trainer))
    state_bytes = device_bytes(trainer.state)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        trainer.train()
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert sum("train_step" in message for message in compiled) == 1, compiled

    plan = trainer.loop.memory_plan
    assert plan.arguments == state_bytes + batch_bytes
    assert plan.donated == state_bytes  # the new state is written over the old: one copy of it, not two
    assert plan.temporaries > 0 and plan.peak == plan.arguments + plan.added
    logged = records(trainer.arguments.output_dir)
    assert logged[0]["planned_memory_mib"] == round(plan.peak / MIB, 2)
    assert logged[0]["planned_temp_mib"] == round(plan.temporaries / MIB, 2)
    assert all("planned_memory_mib" not in record for record in logged[1:])


def test_a_step_that_cannot_fit_is_refused_before_it_runs_and_the_checkpoint_is_kept(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    first = BaseTrainer(tiny_args(output_dir, save_strategy="steps", save_steps=2))
    first.train()
    added = first.loop.memory_plan.added
    limit = 16 * 2**30

    monkeypatch.setattr(memory_plan, "headroom", lambda devices: Headroom("gpu:0", limit, limit - added + 1))
    resumed = BaseTrainer(tiny_args(output_dir, max_steps=4, resume_from_checkpoint="latest"))
    with pytest.raises(DeviceMemoryError) as refused:
        resumed.train()
    message = str(refused.value)
    for fix in ("train_batch_size", "gradient_accumulation_steps", "remat_policy", "loss_chunk_size", "fsdp_size"):
        assert fix in message
    assert "gpu:0" in message and "no checkpoint was written" in message
    assert int(resumed.state.step) == 2  # nothing ran: the restored state is intact, not donated
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(resumed.state.params))
    with CheckpointManager(output_dir / CHECKPOINTS_DIRNAME) as manager:
        assert manager.all_steps() == [2]

    monkeypatch.setattr(memory_plan, "headroom", lambda devices: Headroom("gpu:0", limit, limit - added))
    fits = BaseTrainer(tiny_args(output_dir, max_steps=4, resume_from_checkpoint="latest"))
    fits.train()  # exactly enough room
    assert int(fits.state.step) == 4


def short_conversations(count: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_list([{"prompt": "1" * int(n), "completion": "2" * int(m)}
                                       for n, m in zip(rng.integers(1, 8, count), rng.integers(1, 6, count))])


def padded_trainer(tmp_path: Path, method: str) -> SFTTrainer | DPOTrainer:
    """A padded run whose first batch is shorter than its largest bucket (64 tokens), which never comes."""
    args = tiny_args(tmp_path, max_length=64, max_steps=4, max_train_samples=None, validation_split_percentage=0)
    trainer = (SFTTrainer(args, dataset_train=short_conversations(48), tokenizer=build_arithmetic_chat_tokenizer())
               if method == "sft" else DPOTrainer(args))  # short arithmetic pairs
    assert first_batch(trainer)["input_ids"].shape[-1] < 64 == trainer._pad.buckets[-1]
    return trainer


def train_step_compiles(caplog) -> list[str]:
    return [message for message in map(logging.LogRecord.getMessage, caplog.records)
            if "Compiling" in message and "train_step" in message]


def at_longest_bucket(message: str) -> bool:
    """Whether a compile message's batch is the 64-token bucket: `[8, 64]` rows, or `[8, 2, 64]` pairs."""
    return re.search(r"int32\[8,(2,)?64\]", message) is not None


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_padded_batches_are_planned_at_their_largest_bucket_and_each_shape_compiles_once(tmp_path, caplog, method,
                                                                                         monkeypatch):
    monkeypatch.setattr(memory_plan, "headroom", lambda devices: Headroom("gpu:0", 2**40, 0))  # a limit to check
    trainer = padded_trainer(tmp_path, method)
    batch = first_batch(trainer)
    length = batch["input_ids"].shape[-1]
    state_bytes = device_bytes(trainer.state)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        narrow = memory_plan.plan_of(trainer.functions.train_step.lower(trainer.state, batch).compile())
        trainer.train()
    # Every batch field the step reads is [..., T] (jit drops the ones it does not): its bytes scale with T.
    assert (trainer.loop.memory_plan.arguments - state_bytes) * length == (narrow.arguments - state_bytes) * 64
    compiled = train_step_compiles(caplog)
    assert len(compiled) == len(set(compiled)) >= 2, compiled  # the planned bucket, then each one met, once each
    assert any(map(at_longest_bucket, compiled)), compiled


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_without_a_limit_to_check_a_padded_run_plans_its_first_batch_and_compiles_no_other_shape(tmp_path, caplog,
                                                                                                method):
    trainer = padded_trainer(tmp_path, method)  # CPU: its allocator reports no limit
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        first = memory_plan.plan_of(trainer.functions.train_step.lower(trainer.state, first_batch(trainer)).compile())
        trainer.train()
    assert trainer.loop.memory_plan == first
    compiled = train_step_compiles(caplog)
    assert compiled and len(compiled) == len(set(compiled)), compiled  # each shape met, once each
    assert not any(map(at_longest_bucket, compiled)), compiled  # and not the bucket that never came


def test_a_trainer_of_your_own_that_pads_to_buckets_names_its_longest_batch_and_is_planned_there(tmp_path, caplog,
                                                                                                 monkeypatch):
    class Bucketed(BaseTrainer):
        def longest_batch_length(self) -> int:
            return 64  # as if its collate padded each batch to 32 or 64 tokens

    monkeypatch.setattr(memory_plan, "headroom", lambda devices: Headroom("gpu:0", 2**40, 0))  # a limit to check
    trainer = Bucketed(tiny_args(tmp_path, max_steps=1))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        trainer.train()
    planned, ran = train_step_compiles(caplog)  # the plan's shape ahead, then the 32-token batch the step met
    assert at_longest_bucket(planned) and not at_longest_bucket(ran), (planned, ran)


def test_headroom_is_the_tightest_device_and_unknown_where_one_reports_no_limit():
    def device(name, stats):
        return SimpleNamespace(memory_stats=lambda: stats, __str__=lambda self: name)

    roomy = device("a", {"bytes_limit": 100, "bytes_in_use": 10})
    tight = device("b", {"bytes_limit": 80, "bytes_in_use": 30})
    room = memory_plan.headroom([roomy, tight])
    assert (room.limit, room.in_use, room.free) == (80, 30, 50)
    assert memory_plan.headroom([roomy, device("cpu", None)]) is None
    assert memory_plan.headroom([roomy, device("tpu", {"bytes_in_use": 1})]) is None
    plan = memory_plan.MemoryPlan(arguments=40, outputs=45, donated=40, temporaries=44, code=1)
    memory_plan.check_fits(plan, room)  # adds 50: fits exactly
    with pytest.raises(DeviceMemoryError, match="needs 0.00 GiB"):
        memory_plan.check_fits(memory_plan.MemoryPlan(40, 45, 40, 45, 1), room)
    memory_plan.check_fits(memory_plan.MemoryPlan(40, 45, 40, 10**12, 1), None)  # no limit known: no check


def reference_plan(tmp_path: Path, **overrides) -> memory_plan.MemoryPlan:
    """The plan of the benchmark Llama's train step (benchmarks/overhead.py), compiled, never run."""
    blocks = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2 * BATCH, LENGTH + 1), dtype=np.int32)
    args = tiny_args(tmp_path, **{**dict(max_length=LENGTH, train_batch_size=BATCH, learning_rate=3e-4, max_steps=1,
                                         validation_split_percentage=0, compilation_cache_dir=""), **overrides})
    trainer = BaseTrainer(args, model=init_model(transformers.LlamaConfig(**CONFIG), seed=0),
                          tokenizer=build_arithmetic_tokenizer(),
                          dataset_train=datasets.Dataset.from_dict({"input_ids": blocks}))
    return trainer.plan_memory(trainer.state, first_batch(trainer))


@pytest.mark.slow
def test_the_reference_plan_has_not_grown_and_each_named_fix_shrinks_it(tmp_path):
    plan = reference_plan(tmp_path / "reference")
    # The state (all of it) is donated; the batch is not: input_ids, targets, loss_mask, 4 bytes per token each.
    assert plan.donated == plan.arguments - BATCH * LENGTH * 4 * 3
    assert plan.temporaries / MIB == pytest.approx(REFERENCE_TEMP_MIB, rel=0.1)
    # Measured: chunked loss 0.90x, half the batch over two micro-batches 0.32x the temporaries. remat_policy's saving
    # is in what autodiff keeps for the backward pass (tests/test_remat.py): XLA:CPU's buffer assignment does not
    # turn it into fewer temporaries (0.91x here while SwiGLU kept its sigmoid and silu, 1.00x since).
    fixes = {"loss_chunk_size": (dict(loss_chunk_size=512), 0.95),
             "train_batch_size": (dict(train_batch_size=BATCH // 2, gradient_accumulation_steps=2), 0.6)}
    for name, (overrides, at_most) in fixes.items():
        smaller = reference_plan(tmp_path / name, **overrides)
        assert smaller.temporaries < at_most * plan.temporaries, (name, smaller.temporaries / MIB)
