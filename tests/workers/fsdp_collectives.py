"""Compile the trainer's train step (bfloat16 compute, float32 parameters) on mesh layouts and print its
collectives as JSON, with one SGD step's results with the weights pinned in use and left to the partitioner.

    python fsdp_collectives.py DATA,FSDP,TENSOR [DATA,FSDP,TENSOR ...]

Collectives are read from the module right after SPMD partitioning: that is where XLA decides what each
all-gather and gradient reduction carries. Later XLA:CPU passes (`all-reduce-promotion`,
`float-normalization-bf16`) upcast every bfloat16 collective to float32, because the CPU runtime has none;
the counts of the final program are printed too. Run with
XLA_FLAGS=--xla_force_host_platform_device_count=8 by tests/test_fsdp_collectives.py.
"""

import json
import math
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import easytrain.models.layers as layers
from easytrain import BaseTrainer, TrainingArguments

jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would skip the passes dumped below
COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter)\(.*?op_name=\"([^\"]*)\"")
BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4}


def trainer_on(data: int, fsdp: int, tensor: int, output_dir: str) -> BaseTrainer:
    args = TrainingArguments(
        output_dir=output_dir, dtype="bfloat16", param_dtype="float32", optimizer="sgd", learning_rate=1.0,
        max_steps=1, max_length=32, train_batch_size=16, eval_strategy="no", save_strategy="no", report_to=["none"],
        disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=32, max_eval_samples=16,
        warmup_steps=0, data_parallel_size=data, fsdp_size=fsdp, tensor_parallel_size=tensor)
    return BaseTrainer(args)


def collectives(hlo: str) -> list[dict]:
    """Every all-gather / all-reduce / reduce-scatter with a non-scalar result: dtype, shape, bytes, op."""
    found = []
    for dtype, dims, kind, op in COLLECTIVE.findall(hlo):
        shape = [int(d) for d in dims.split(",") if d]
        if shape:
            found.append({"kind": kind, "dtype": dtype, "shape": shape, "op": op,
                          "bytes": math.prod(shape) * BYTES.get(dtype, 0)})
    return found


def partitioned_and_final(step, state, batch) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as dump:
        compiled = step.lower(state, batch).compile({"xla_dump_to": dump, "xla_dump_hlo_pass_re": "spmd-partitioning"})
        partitioned = [p for p in Path(dump).glob("*train_step*after_spmd-partitioning*.txt")]
        assert len(partitioned) == 1, sorted(p.name for p in Path(dump).iterdir())[:20]
        return partitioned[0].read_text(), compiled.as_text()


def one_step(trainer: BaseTrainer, batch) -> dict:
    """Collectives and one SGD step's loss and updated parameters, from a copy of the initial state."""
    step = trainer.configure_functions().train_step
    state = jax.tree.map(jnp.copy, trainer.state)
    partitioned, final = partitioned_and_final(step, state, batch)
    new_state, metrics = step(state, batch)
    params = {jax.tree_util.keystr(path): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(new_state.params)}
    final_gathers = [c["dtype"] for c in collectives(final) if c["kind"] == "all-gather"]
    return {"collectives": collectives(partitioned), "final_gather_dtypes": sorted(set(final_gathers)),
            "loss": float(metrics["loss"].total / metrics["loss"].count), "params": params}


def in_use_shapes(trainer: BaseTrainer) -> dict[str, list[int]]:
    """Each parameter's shape as one device computes with it: split over `tensor` only."""
    shapes = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(trainer.state.params),
                                      jax.tree.leaves(trainer.state_shardings.params)):
        spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        split = [trainer.mesh.shape["tensor"] if axis == "tensor" or (isinstance(axis, tuple) and "tensor" in axis)
                 else 1 for axis in spec]
        shapes[jax.tree_util.keystr(path)] = [dim // parts for dim, parts in zip(leaf.shape, split)]
    return shapes


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as scratch:  # the trainers' output directories
        for layout in sys.argv[1:]:
            data, fsdp, tensor = map(int, layout.split(","))
            trainer = trainer_on(data, fsdp, tensor, f"{scratch}/{layout}")
            batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
            pinned = one_step(trainer, batch)
            in_use = layers.weight_in_use
            layers.weight_in_use = lambda w, axes, dtype: w.astype(dtype)  # the partitioner decides where to gather
            try:
                plain = one_step(trainer, batch)
            finally:
                layers.weight_in_use = in_use
            difference = max(float(np.max(np.abs(pinned["params"][k] - plain["params"][k]))) for k in plain["params"])
            shapes = in_use_shapes(trainer)
            for run in (pinned, plain):
                del run["params"]
            results[layout] = {"pinned": pinned, "plain": plain, "param_shapes": shapes,
                               "max_param_difference": difference}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
