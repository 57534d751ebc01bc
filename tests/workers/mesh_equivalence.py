"""Train 5 steps on one mesh layout and print per-step losses and shard facts as JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 by tests/test_sharding.py.
"""

import json
import os
import sys
import tempfile

import jax
import numpy as np

from easytrain import BaseTrainer, TrainingArguments


def multi_process_arguments() -> dict:
    """Set by the 2-process test: `host:port,num_processes,process_id`."""
    spec = os.environ.get("EASYTRAIN_TEST_PROCESSES")
    if not spec:
        return {}
    address, count, index = spec.split(",")
    return {"coordinator_address": address, "num_processes": int(count), "process_id": int(index)}


def main(data: int, fsdp: int, tensor: int, num_devices: int, output_dir: str = "", stop_at: int = 0,
         resume: int = 0, accumulation: int = 1) -> None:
    """`stop_at` ends the run after that step (checkpointing it); `resume` continues the latest checkpoint;
    `accumulation` splits each global batch into that many micro-batches."""
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(), resume_from_checkpoint="latest" if resume else None,
        save_strategy="no" if not (stop_at or resume) else "steps", save_steps=1000, max_steps=5, max_length=32, train_batch_size=16, eval_batch_size=16,
        logging_steps=1, eval_strategy="no", report_to=["jsonl"], disable_progress_bar=True,
        save_pretrained_at_end=False, max_train_samples=128, max_eval_samples=16, warmup_steps=0,
        data_parallel_size=data, fsdp_size=fsdp, tensor_parallel_size=tensor,
        gradient_accumulation_steps=accumulation, **multi_process_arguments())

    class Trainer(BaseTrainer):
        def configure_mesh(self):
            from easytrain.sharding import make_mesh
            return make_mesh(data, fsdp, tensor, devices=jax.devices()[:num_devices])

    trainer = Trainer(args)
    losses = []

    from easytrain import Callback

    class Record(Callback):
        def on_log(self, trainer, step, logs):
            losses.append(logs["loss"])

        def on_step_end(self, trainer, step):
            trainer.should_stop = step == stop_at

    trainer.callbacks.add(Record())
    trainer.train()
    state = trainer.state
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    specs = {jax.tree_util.keystr(path): str(leaf.sharding.spec) for path, leaf in leaves}
    shard_shapes = {jax.tree_util.keystr(path): list(leaf.addressable_shards[0].data.shape) for path, leaf in leaves}
    per_device = lambda tree: sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree)
                                  if hasattr(leaf, "addressable_shards"))
    total = lambda tree: sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))
    rows = trainer._data.train.iterator(0)
    example_ids = [next(rows)["example_id"].tolist() for _ in range(5)]
    written = sorted(os.listdir(args.output_dir))
    print(json.dumps({"losses": losses, "example_ids": example_ids, "process": jax.process_index(), "written": written, "specs": specs, "shard_shapes": shard_shapes,
                      "param_bytes_per_device": per_device(state.params), "param_bytes": total(state.params),
                      "opt_bytes_per_device": per_device(state.opt_state), "opt_bytes": total(state.opt_state)}))


if __name__ == "__main__":
    numbers = [int(a) for a in sys.argv[1:5]]
    extra = sys.argv[5:]
    main(*numbers, *(extra[:1] + [int(a) for a in extra[1:]]))
