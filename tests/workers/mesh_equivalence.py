"""Train 5 steps on one mesh layout and print per-step losses and shard facts as JSON.

    python mesh_equivalence.py DATA FSDP TENSOR DEVICES [--output-dir D] [--stop-at N] [--resume]
        [--accumulation A] [--ragged] [--save-params FILE.npz] [--evaluate] [--attention IMPLEMENTATION]
        [--collectives] [--scan] [--loss-chunk-size C] [--dpo]
    python mesh_equivalence.py --each '[["1", "1", "1", "1", "--evaluate"], ["8", "1", "1", "8"], ...]'

`--each`: several layouts one after another in this process, one JSON line each (a process's start, its
imports, tokenizer and data, costs more than a layout's five steps). `--dpo`: instead of the five steps, one DPO step
with precomputed reference log-probs on (8,1,1) (tests/workers/dpo_precomputed.py). Each line also holds the
tokens each step logged (`tokens_per_second` x `step_time`: the global batch's, whatever the process count).

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 by tests/test_sharding.py, and as
2 processes x 4 devices by tests/test_multiprocess.py.
"""

import argparse
import json
import os
import re
import sys
import tempfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from easytrain import BaseTrainer, Callback, TrainingArguments
from easytrain.generation import generate, pad_prompts
from easytrain.sharding import make_mesh
from dpo_precomputed import precomputed_dpo_step


def multi_process_arguments() -> dict:
    """Set by the 2-process test: `host:port,num_processes,process_id`."""
    spec = os.environ.get("EASYTRAIN_TEST_PROCESSES")
    if not spec:
        return {}
    address, count, index = spec.split(",")
    return {"coordinator_address": address, "num_processes": int(count), "process_id": int(index)}


def ragged_loss_mask(example_id_N: np.ndarray, length: int) -> np.ndarray:
    """Each row supervises only its last few tokens, a different number per example; every 4th none.

    Depends only on the example, so every layout and process count sees the same masks.
    """
    supervised_N = (example_id_N.astype(np.int64) * 7919 + 3) % (length + 1)
    supervised_N = np.where(example_id_N % 4 == 0, 0, supervised_N)
    return (np.arange(length)[None, :] >= length - supervised_N[:, None]).astype(np.float32)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    for axis in ("data", "fsdp", "tensor", "devices"):
        parser.add_argument(axis, type=int)
    parser.add_argument("--output-dir", default="")
    parser.add_argument("--stop-at", type=int, default=0, help="end after this step, checkpointing it")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per global batch")
    parser.add_argument("--ragged", action="store_true", help="ragged loss masks, some rows fully masked; SGD")
    parser.add_argument("--save-params", default="", help="write the initial and final parameters to this .npz")
    parser.add_argument("--evaluate", action="store_true", help="run evaluate() with the exact-match evaluator")
    parser.add_argument("--attention", default="xla", help="attention_implementation")
    parser.add_argument("--collectives", action="store_true", help="count the compiled train step's collectives")
    parser.add_argument("--scan", action="store_true", help="scan_layers: the decoder layers stored stacked")
    parser.add_argument("--loss-chunk-size", type=int, default=0, help="loss_chunk_size: head on C tokens at a time")
    parser.add_argument("--profile", action="store_true", help="trace steps 2-3 with jax.profiler (profile_steps)")
    parser.add_argument("--dpo", action="store_true", help="one DPO step with precomputed reference log-probs")
    return parser.parse_args(argv)


def build_trainer(options: argparse.Namespace) -> BaseTrainer:
    checkpointing = options.stop_at or options.resume
    args = TrainingArguments(
        output_dir=options.output_dir,
        resume_from_checkpoint="latest" if options.resume else None,
        save_strategy="steps" if checkpointing else "no", save_steps=1000, max_steps=5, max_length=32,
        train_batch_size=16, eval_batch_size=16, logging_steps=1, eval_strategy="no", report_to=["jsonl"],
        disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=128, max_eval_samples=32,
        warmup_steps=0, data_parallel_size=options.data, fsdp_size=options.fsdp,
        tensor_parallel_size=options.tensor, gradient_accumulation_steps=options.accumulation,
        attention_implementation=options.attention, scan_layers=options.scan, loss_chunk_size=options.loss_chunk_size,
        profile_steps=2 if options.profile else 0, profile_start_step=2,
        # SGD's update is linear in the gradient; Adam divides near-zero gradients by their own size,
        # which turns float32 rounding into learning-rate-sized differences in a few weights.
        **(dict(optimizer="sgd", learning_rate=0.3) if options.ragged else {}), **multi_process_arguments())

    class Trainer(BaseTrainer):
        def configure_mesh(self):
            return make_mesh(options.data, options.fsdp, options.tensor, devices=jax.devices()[:options.devices])

        def to_global(self, host_batch):
            if options.ragged:
                mask = ragged_loss_mask(host_batch["example_id"], host_batch["loss_mask"].shape[1])
                host_batch = {**host_batch, "loss_mask": host_batch["loss_mask"] * mask}
            return super().to_global(host_batch)

    return Trainer(args)


def shard_facts(state) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    per_device = lambda tree: sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree)
                                  if hasattr(leaf, "addressable_shards"))
    total = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
    return {"specs": {jax.tree_util.keystr(path): str(leaf.sharding.spec) for path, leaf in leaves},
            "shard_shapes": {jax.tree_util.keystr(path): list(leaf.addressable_shards[0].data.shape)
                             for path, leaf in leaves},
            "param_bytes_per_device": per_device(state.params), "param_bytes": total(state.params),
            "opt_bytes_per_device": per_device(state.opt_state), "opt_bytes": total(state.opt_state)}


def constraints_in_train_step(trainer: BaseTrainer) -> int:
    """How many activation sharding constraints the trainer's jitted train step traces to (0: none took effect)."""
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    return str(trainer.functions.train_step.trace(trainer.state, batch).jaxpr).count("sharding_constraint")


def collectives_in_train_step(trainer: BaseTrainer) -> dict[str, int]:
    """How many of each collective the compiled train step runs."""
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    hlo = trainer.functions.train_step.lower(trainer.state, batch).compile().as_text()
    kinds = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return {kind: len(re.findall(rf"= \S+ {kind}(?:-start)?\(", hlo)) for kind in kinds}


def host_params(trainer: BaseTrainer, prefix: str) -> dict[str, np.ndarray]:
    params = multihost_utils.process_allgather(trainer.state.params, tiled=True)
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def sampled_tokens(trainer: BaseTrainer) -> dict[str, list]:
    """Sampled continuations of 32 held-out prompts, generated outside and inside the mesh context.

    Samples vary even from a barely trained model, whose greedy completions all look alike; inside the
    mesh context the activation constraints split the rows across processes.
    """
    tokenizer = trainer.tokenizer
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in trainer.evaluators[0].prompts[:32]]
    ids, mask = pad_prompts(prompts, tokenizer.pad_token_id)
    sample = lambda: generate(trainer.model, ids, mask, max_new_tokens=8, do_sample=True, seed=0).tolist()
    sampled = sample()
    with jax.set_mesh(trainer.mesh):
        return {"sampled": sampled, "sampled_under_mesh": sample()}


def run(options: argparse.Namespace) -> dict:
    if not options.output_dir:  # a scratch directory, gone with the run
        with tempfile.TemporaryDirectory() as scratch:
            return run(argparse.Namespace(**{**vars(options), "output_dir": scratch}))
    if options.dpo:
        return {"process": jax.process_index(), **precomputed_dpo_step(options.output_dir, multi_process_arguments())}
    trainer = build_trainer(options)
    initial = host_params(trainer, "initial") if options.save_params else {}
    losses, tokens, logged_tokens = [], [], []

    class Record(Callback):
        def on_log(self, trainer, step, logs):
            losses.append(logs["loss"])
            tokens.append(logs["num_tokens"])
            logged_tokens.append(round(logs["tokens_per_second"] * logs["step_time"]))  # one step a window

        def on_step_end(self, trainer, step):
            trainer.should_stop = step == options.stop_at

    trainer.callbacks.add(Record())
    trainer.train()
    rows = trainer.dataloaders.train.iterator(0)
    result = {"losses": losses, "num_tokens": tokens, "logged_tokens": logged_tokens, "process": jax.process_index(),
              "example_ids": [next(rows)["example_id"].tolist() for _ in range(5)],
              "written": sorted(os.listdir(trainer.arguments.output_dir)),
              "constraints": constraints_in_train_step(trainer), **shard_facts(trainer.state)}
    if options.collectives:
        result["collectives"] = collectives_in_train_step(trainer)
    if options.evaluate:
        result["eval"] = trainer.evaluate()
        result.update(sampled_tokens(trainer))
    if options.save_params:
        np.savez(options.save_params, **initial, **host_params(trainer, "final"))
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--each"]:
        for argv in json.loads(sys.argv[2]):
            print(json.dumps(run(parse(argv))), flush=True)
    else:
        print(json.dumps(run(parse())))
