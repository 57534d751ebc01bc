"""Per-device memory, collectives and step time of one model on several meshes of 8 CPU devices,
with and without the model's activation sharding constraints.

    python -m benchmarks.scaling [--quick] [--rounds 6] [--meshes 8,1,1 1,8,1 2,2,2 1,2,4]

The 6.3M-parameter Llama of `benchmarks/overhead.py`, global batch 16 × 256 tokens, AdamW. For each
mesh the trainer places the state; then `steps.train_step` with the trainer's loss, shardings and
donation is compiled twice, once plain and once wrapped in `sharding.with_activation_layout` (so
`sharding.constrain` in the model takes effect). Reported per variant: the compiled program's per-device
temp/argument bytes (`memory_analysis()`), the collectives in its HLO (count, bytes, most frequent shapes), and the
median step time over `rounds` steps alternated between the variants. Prints one JSON line. `--quick`: a
tiny model (hidden 32, 1 layer) on 16-token rows, a smoke run. On 2
physical cores the 8 "devices" share the same cores, so step times show the cost of each layout's
communication and layout changes, not a speed-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # keep the caller's other flags
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from easytrain import BaseTrainer, TrainingArguments, sharding, steps  # noqa: E402
from easytrain.memory_plan import plan_of  # noqa: E402
from easytrain.models import init_model  # noqa: E402
from easytrain.tasks import build_arithmetic_tokenizer  # noqa: E402
from benchmarks.report import relaunch_like_the_command, scratch_dir  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
QUICK = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
BATCH, LENGTH = 16, 256
COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
SHAPE = re.compile(r"(f32|bf16|s32|u32|pred|f16)\[([\d,]*)\]")
ITEM_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}


def per_device_bytes(tree) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def collectives(hlo: str) -> dict[str, dict]:
    """Count and output bytes of each collective, and the most frequent all-gather output shapes."""
    found: dict[str, dict] = {}
    for result, op, _ in COLLECTIVE.findall(hlo):
        entry = found.setdefault(op, {"count": 0, "bytes": 0, "shapes": {}})
        for dtype, dims in SHAPE.findall(result):
            shape = tuple(int(d) for d in dims.split(",") if d)
            entry["count"] += 1
            entry["bytes"] += ITEM_BYTES[dtype] * int(np.prod(shape))
            entry["shapes"][str(list(shape))] = entry["shapes"].get(str(list(shape)), 0) + 1
    for entry in found.values():
        entry["shapes"] = dict(sorted(entry["shapes"].items(), key=lambda item: -item[1])[:8])
    return found


def build_trainer(mesh: tuple[int, int, int], blocks: np.ndarray, config: dict) -> BaseTrainer:
    data, fsdp, tensor = mesh
    arguments = TrainingArguments(
        compilation_cache_dir="",  # no persistent cache: every process compiles cold, as its contender
        output_dir=scratch_dir("easytrain-scaling-"), max_length=blocks.shape[1] - 1,
        train_batch_size=BATCH,
        max_steps=100, learning_rate=3e-4, lr_scheduler_type="constant", eval_strategy="no",
        save_strategy="no", report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
        validation_split_percentage=0, data_parallel_size=data, fsdp_size=fsdp, tensor_parallel_size=tensor)
    trainer = BaseTrainer(arguments, model=init_model(transformers.LlamaConfig(**config)),
                          tokenizer=build_arithmetic_tokenizer(),
                          dataset_train=datasets.Dataset.from_dict({"input_ids": blocks}))
    trainer.setup()
    return trainer


def compile_variant(trainer: BaseTrainer, batch: dict, constrained: bool):
    """The trainer's train step (same shardings and donation), optionally traced under the mesh."""
    step = functools.partial(steps.train_step, loss_fn=trainer.compute_loss, schedule=trainer.scheduler)
    if constrained:
        step = sharding.with_activation_layout(step, trainer.mesh, trainer.partition_rules)
    state_sh, mesh = trainer.state_shardings, trainer.mesh
    jitted = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    return jitted.lower(trainer.state, batch).compile()


def measure(mesh: tuple[int, int, int], blocks: np.ndarray, config: dict, rounds: int) -> dict:
    trainer = build_trainer(mesh, blocks, config)
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=trainer.state_shardings)
    variants = {}
    for name, constrained in (("plain", False), ("constrained", True)):
        started = time.perf_counter()
        compiled = compile_variant(trainer, batch, constrained)
        plan = plan_of(compiled)
        variants[name] = {"compiled": compiled, "state": copy(trainer.state), "times": [], "losses": [],
                          "compile_seconds": round(time.perf_counter() - started, 2),
                          "temp_bytes": plan.temporaries, "argument_bytes": plan.arguments,
                          "output_bytes": plan.outputs, "alias_bytes": plan.donated,
                          "collectives": collectives(compiled.as_text())}
    for _ in range(rounds):  # alternate, so both variants see the same machine load
        for variant in variants.values():
            started = time.perf_counter()
            variant["state"], metrics = variant["compiled"](variant["state"], batch)
            jax.block_until_ready(metrics)
            variant["times"].append(time.perf_counter() - started)
            variant["losses"].append(metrics["loss"].result())
    state = trainer.state
    result = {"mesh": {"data": mesh[0], "fsdp": mesh[1], "tensor": mesh[2]},
              "param_bytes_total": sum(leaf.nbytes for leaf in jax.tree.leaves(state.params)),
              "param_bytes_per_device": per_device_bytes(state.params),
              "opt_bytes_per_device": per_device_bytes(state.opt_state)}
    for name, variant in variants.items():
        result[name] = {key: value for key, value in variant.items() if key not in ("compiled", "state", "times")}
        result[name]["step_seconds"] = round(statistics.median(variant["times"][1:]), 4)
        result[name]["losses"] = [round(loss, 6) for loss in variant["losses"]]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model and rows: a smoke run")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--meshes", nargs="*", default=[",".join(map(str, m)) for m in MESHES])
    options = parser.parse_args(argv)
    if options.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the first round compiles and is not timed), got {options.rounds}")
    config = {**CONFIG, **(QUICK if options.quick else {})}
    length = 16 if options.quick else LENGTH
    blocks = np.random.default_rng(0).integers(0, config["vocab_size"], (BATCH * 8, length + 1)).astype(np.int32)
    meshes = [tuple(int(size) for size in text.split(",")) for text in options.meshes]
    output = {"benchmark": "scaling", "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
              "meshes": [measure(mesh, blocks, config, options.rounds) for mesh in meshes]}
    print(json.dumps(output))
    return output


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
