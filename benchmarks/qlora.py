"""QLoRA through Google's `qwix` against easytrain's own LoRA: base-weight bytes, losses, quantisation error.

    python -m benchmarks.qlora [--quick] [--out FILE]

Needs `qwix` (`pip install qwix==0.1.8 -c constraints.txt`; it changes nothing else).

One Llama (`LlamaForCausalLM`, untied head) is first trained in full, float32, on task A; then every
side fine-tunes a copy of that base with rank-`r` adapters on all seven projections (q, k, v, o, gate,
up, down) on task B, with the same data, learning rate, rank, alpha and optimizer (Adam), through
easytrain's own `TrainState` + `steps.train_step` (trainable: `nnx.LoRAParam`; base: every other
`nnx.Param`, no gradient, no optimizer state):

- `easytrain_lora`: `easytrain.lora.apply_lora` on the float32 base;
- `qwix_lora`: `qwix.apply_lora_to_model` on the float32 base;
- `qwix_qlora_int8`: the same with `weight_qtype=int8` (per output channel absmax scales);
- `qwix_qlora_int4`, `qwix_qlora_nf4`: `int4` / `"nf4"`, one scale per `--tile_size` inputs
  (QLoRA's block size 64; no double quantisation of the scales).

Only the seven projections are quantised (as QLoRA does); the embedding, the output head and the norms
stay float32. Every side's `lora_a` starts from the same values (easytrain's, copied into qwix's
`kernel_lora_a`), and `lora_b` at zero, so at step 0 every side computes its own base, and the sides
differ only by the base they hold.

The tasks: sparse Markov chains over the first `--task_vocab` token ids: each token has `--branch`
allowed successors, drawn uniformly (the best possible loss is `log(branch)`). Task B is task A with
a fraction `--changed` of the rows (tokens) given new successors, so the base knows most of B and the
adapters must learn the rest. Batches are drawn once, from a fixed seed, and are the same for all.

Reported per side:
- `base_bytes`: the frozen base as held in the model state: `nbytes` by dtype and in total, the
  bytes the runtime allocates for those arrays (`on_device_size_in_bytes`), and `packed_bytes` (what a
  runtime that packs 4-bit values two to a byte would hold); the projections alone under `projections`.
- `trainable_params`; `init`: the max and mean |logit| difference from the float base on the eval rows
  at step 0 (the quality cost of quantisation alone), the float base's max |logit|, and task A and B
  eval losses at step 0; `final_train_loss` (mean of the last `--loss_window` steps), `eval_loss` and
  `eval_accuracy` on held-out task B rows; for qwix sides, `merge`: the max |logit| difference between
  the trained model and a plain float model whose kernels are `dequantise(base) + alpha/r * A @ B`
  (a merge is possible), and `adapters_on_float_base_eval_loss`: the adapters put on the float32 base
  (what a PEFT export onto the original weights would compute); `step_seconds` (median, after
  compilation; not asserted anywhere) and the compiled step's `memory_analysis()` (argument, output, alias,
  temp bytes, and `peak_estimate_bytes` = argument + output - alias + temp: CPU has no peak counter);
  `aot_executable_rejected_state`: set when that executable refused the state's int4 arrays (the steps
  then run through the jit call path, which accepts them).

`compat` records, on a tiny model, what the qwix path does with the rest of easytrain: the decode path
(`generate`), LoRA dropout and eval mode, `lora.merge_lora` / `lora.adapters_disabled` (DPO's reference),
`lora.base_fingerprint` of a 4-bit base, gradients over every `nnx.Param`, the adapters' dtype under a
bfloat16 base, and the `WithAux.astype` failure of qwix 0.1.8 that this script patches (`qwix_patch`,
only while it runs) so that easytrain's `Dense` (`kernel[...].astype(dtype)`) can run a quantised kernel
more than once. Prints a table and one JSON line (also written to `--out`). The full profile takes about
170 s of CPU time (4 minutes wall on 2 shared cores); `--quick` well under a minute.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import resource
import statistics
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from easytrain import lora, placement, sharding, steps  # noqa: E402
from easytrain.memory_plan import plan_of  # noqa: E402
from easytrain.losses import causal_lm_loss  # noqa: E402
from easytrain.models.llama import init_model  # noqa: E402

import qwix  # noqa: E402  (optional: pip install qwix==0.1.8 -c constraints.txt)
from benchmarks.qwix_sides import (  # noqa: E402
    PROJECTIONS,
    QWIX_PATCH,
    adapted_modules,
    apply_qwix,
    compat_checks,
    merged_float_model,
    qwix_astype_patch,
    qwix_provider,
)
from benchmarks.report import emit, fill_defaults, relaunch_like_the_command  # noqa: E402

#: Sizes of one run: the full profile (about 170 s of CPU time), and `--quick` (a smoke test).
PROFILES = {
    "full": dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
                 vocab_size=4096, task_vocab=256, branch=4, changed=0.25, max_length=64, batch_size=8,
                 pretrain_steps=200, steps=120, eval_rows=32, rank=16, alpha=32.0, learning_rate=5e-3,
                 pretrain_learning_rate=3e-3, tile_size=64, loss_window=10),
    "quick": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  vocab_size=256, task_vocab=64, branch=4, changed=0.25, max_length=16, batch_size=8,
                  pretrain_steps=12, steps=6, eval_rows=16, rank=4, alpha=8.0, learning_rate=5e-3,
                  pretrain_learning_rate=3e-3, tile_size=32, loss_window=3),
}
SIDES = ("easytrain_lora", "qwix_lora", "qwix_qlora_int8", "qwix_qlora_int4", "qwix_qlora_nf4")


# ---------------------------------------------------------------------------------------------- data


def markov_tables(options: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Successor tables `[task_vocab, branch]` of task A and of task B (A with `changed` of its rows redrawn)."""
    rng = np.random.default_rng(options.seed + 1)
    table_a = rng.integers(0, options.task_vocab, (options.task_vocab, options.branch))
    table_b = table_a.copy()
    redraw = rng.random(options.task_vocab) < options.changed
    table_b[redraw] = rng.integers(0, options.task_vocab, (int(redraw.sum()), options.branch))
    return table_a, table_b


def walks(table: np.ndarray, rows: int, length: int, seed: int) -> np.ndarray:
    """`rows` random walks of `length + 1` tokens on the chain `table`."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, length + 1), np.int32)
    out[:, 0] = rng.integers(0, table.shape[0], rows)
    choices = rng.integers(0, table.shape[1], (rows, length))
    for t in range(length):
        out[:, t + 1] = table[out[:, t], choices[:, t]]
    return out


def as_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones(tokens[:, 1:].shape, np.float32)}


# ---------------------------------------------------------------------------------------------- training


def llama_config(options: argparse.Namespace) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=options.vocab_size, hidden_size=options.hidden_size, intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_layers, num_attention_heads=options.num_heads,
        num_key_value_heads=options.num_kv_heads, max_position_embeddings=options.max_length,
        tie_word_embeddings=False)


@functools.cache
def compiled_eval() -> Callable:
    def evaluate(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        model.eval()
        logits = model(batch["input_ids"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["targets"])
        return jnp.mean(nll), accuracy, logits

    return nnx.jit(evaluate)


def evaluate(model: nnx.Module, batch: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray]:
    loss, accuracy, logits = compiled_eval()(model, batch)
    return float(loss), float(accuracy), np.asarray(logits)


def train(model: nnx.Module, batches: np.ndarray, learning_rate: float, trainable: Any, base: Any,
          loss_window: int) -> dict[str, Any]:
    """`len(batches)` Adam steps with easytrain's `train_step`; the trained module and what was measured."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx = optax.adam(learning_rate)
    state, _ = placement.place_module(model, tx, seed=0, mesh=mesh, trainable=trainable, base=base)
    step = jax.jit(functools.partial(steps.train_step, loss_fn=causal_lm_loss,
                                     schedule=optax.constant_schedule(learning_rate)), donate_argnums=0)
    losses, seconds = [], []
    with jax.set_mesh(mesh):
        first = jax.device_put(as_batch(batches[0]), sharding.batch_sharding(mesh))
        compiled = step.lower(state, first).compile()
        plan, runner, aot_rejected = plan_of(compiled), compiled, None
        for i, tokens in enumerate(batches):
            batch = jax.device_put(as_batch(tokens), sharding.batch_sharding(mesh))
            started = time.perf_counter()
            try:
                state, metrics = runner(state, batch)
            except ValueError as error:  # raised before anything runs: no buffer is donated yet
                # An executable compiled ahead rejects int4 arrays that `jax.device_put` copied (as
                # `place_module` does): it wants the packed layout (`sub_byte_element_size_in_bits=4`); the
                # jit call path accepts them.
                if i or runner is step or "layouts" not in str(error):
                    raise
                aot_rejected, runner = str(error).splitlines()[0][:120], step
                state, metrics = runner(state, batch)
            loss = metrics["loss"]
            losses.append(float(loss.total / loss.count))  # waits for the step
            if i:
                seconds.append(time.perf_counter() - started)
    step_memory = None if plan is None else {
        "argument_bytes": plan.arguments, "output_bytes": plan.outputs, "alias_bytes": plan.donated,
        "temp_bytes": plan.temporaries, "peak_estimate_bytes": plan.peak - plan.code}
    del model  # its arrays were copied onto the mesh; the trained values are in `state`
    return {"model": state.model(), "losses": losses,
            "final_train_loss": round(float(np.mean(losses[-loss_window:])), 4),
            "step_seconds": round(statistics.median(seconds), 4) if seconds else None,
            "step_memory": step_memory, "aot_executable_rejected_state": aot_rejected,
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params)))}


# ---------------------------------------------------------------------------------------------- bytes


def _bits(dtype: Any) -> int:
    """Bits per element: 4 for int4/uint4 (numpy's itemsize says 1 byte), else the itemsize."""
    return 4 if jnp.dtype(dtype).name in ("int4", "uint4") else jnp.dtype(dtype).itemsize * 8


def byte_counts(arrays: list[jax.Array]) -> dict[str, Any]:
    by_dtype: dict[str, int] = {}
    for x in arrays:
        by_dtype[str(x.dtype)] = by_dtype.get(str(x.dtype), 0) + int(x.nbytes)
    return {"nbytes_by_dtype": dict(sorted(by_dtype.items())), "nbytes": int(sum(x.nbytes for x in arrays)),
            "on_device_bytes": int(sum(x.on_device_size_in_bytes() for x in arrays)),
            "packed_bytes": int(sum(math.ceil(x.size * _bits(x.dtype) / 8) for x in arrays))}


def base_bytes(model: nnx.Module) -> dict[str, Any]:
    """The frozen base (every `nnx.Param` but the adapters) in the model state, and its projections alone."""
    _, base = nnx.split(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)), ...)[:2]
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(base))
    projections = [x for path, x in leaves if "_proj" in jax.tree_util.keystr(path)]
    return {**byte_counts([x for _, x in leaves]), "projections": byte_counts(projections)}


# ---------------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, well under a minute)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", nargs="+", choices=SIDES, help="default: all")
    parser.add_argument("--no_compat", action="store_true", help="skip the compatibility checks")
    for name, value in PROFILES["full"].items():
        parser.add_argument(f"--{name}", type=type(value), help="default: from the profile")
    options = parser.parse_args(argv)
    fill_defaults(options, PROFILES["quick" if options.quick else "full"])
    options.sides = tuple(options.sides or SIDES)
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    table_a, table_b = markov_tables(options)
    rows, length = options.batch_size, options.max_length
    pretrain_batches = walks(table_a, options.pretrain_steps * rows, length, options.seed + 10).reshape(
        options.pretrain_steps, rows, length + 1)
    train_batches = walks(table_b, options.steps * rows, length, options.seed + 20).reshape(options.steps, rows,
                                                                                             length + 1)
    eval_a = as_batch(walks(table_a, options.eval_rows, length, options.seed + 30))
    eval_b = as_batch(walks(table_b, options.eval_rows, length, options.seed + 40))

    # The float32 base, trained in full on task A.
    model = init_model(llama_config(options), seed=options.seed)
    pretrain = train(model, pretrain_batches, options.pretrain_learning_rate, nnx.Param, nnx.Nothing,
                     options.loss_window) if options.pretrain_steps else None
    float_base = pretrain["model"] if pretrain else model
    float_loss_a, _, _ = evaluate(float_base, eval_a)
    float_loss_b, _, float_logits_b = evaluate(float_base, eval_b)

    # The same initial A for every side: easytrain's draw.
    config = lora.LoRAConfig(rank=options.rank, alpha=options.alpha)
    reference = lora.apply_lora(nnx.clone(float_base), config, rngs=nnx.Rngs(params=options.seed))
    initial_a = {path: module.lora_a[...] for path, module in adapted_modules(reference).items()}
    example_ids = jnp.asarray(eval_b["input_ids"][:2])

    results: dict[str, Any] = {}
    with qwix_astype_patch():
        for side in options.sides:
            if side == "easytrain_lora":
                adapted = lora.apply_lora(nnx.clone(float_base), config, rngs=nnx.Rngs(params=options.seed))
            else:
                adapted = apply_qwix(float_base, qwix_provider(options, side), example_ids, options.seed)
                for path, module in adapted_modules(adapted).items():
                    module.kernel_lora_a[...] = initial_a[path].astype(module.kernel_lora_a.dtype)
            assert set(adapted_modules(adapted)) == set(initial_a), side
            init_loss_a, _, _ = evaluate(adapted, eval_a)
            init_loss_b, _, init_logits_b = evaluate(adapted, eval_b)
            entry: dict[str, Any] = {
                "base_bytes": base_bytes(adapted),
                "init": {"max_abs_logit_diff_vs_float_base": float(np.max(np.abs(init_logits_b - float_logits_b))),
                         "mean_abs_logit_diff_vs_float_base": float(np.mean(np.abs(init_logits_b - float_logits_b))),
                         "float_base_max_abs_logit": float(np.max(np.abs(float_logits_b))),
                         "eval_loss_task_a": round(init_loss_a, 4), "eval_loss": round(init_loss_b, 4)},
            }
            run = train(adapted, train_batches, options.learning_rate, nnx.LoRAParam, nnx.Param, options.loss_window)
            trained = run.pop("model")
            eval_loss, eval_accuracy, logits_b = evaluate(trained, eval_b)
            entry.update(trainable_params=run["trainable_params"], final_train_loss=run["final_train_loss"],
                         eval_loss=round(eval_loss, 4), eval_accuracy=round(eval_accuracy, 4),
                         step_seconds=run["step_seconds"], step_memory=run["step_memory"],
                         aot_executable_rejected_state=run["aot_executable_rejected_state"],
                         train_loss_curve=[round(x, 4) for x in run["losses"][:: max(1, options.steps // 10)]])
            scaling = options.alpha / options.rank
            if side != "easytrain_lora":
                on_dequantised = merged_float_model(float_base, trained, scaling, on_dequantised=True)
                _, _, merged_logits = evaluate(on_dequantised, eval_b)
                on_float = merged_float_model(float_base, trained, scaling, on_dequantised=False)
                entry["merge"] = {"dequantised_plus_delta_max_abs_logit_diff": float(np.max(np.abs(merged_logits
                                                                                                   - logits_b))),
                                  "adapters_on_float_base_eval_loss": round(evaluate(on_float, eval_b)[0], 4)}
            else:
                entry["merge"] = {"merge_lora_max_abs_logit_diff": float(np.max(np.abs(
                    evaluate(lora.merge_lora(trained), eval_b)[2] - logits_b))),
                    "adapters_on_float_base_eval_loss": round(eval_loss, 4)}
            results[side] = entry
    compat = None if options.no_compat else compat_checks(options)

    float_bytes = results.get("qwix_lora", results.get("easytrain_lora", {})).get("base_bytes")
    result = {
        "benchmark": "qlora_qwix", "qwix_version": qwix.__version__, "jax_version": jax.__version__,
        "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
        "model": {k: getattr(options, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                  "num_kv_heads", "vocab_size")},
        "task": {"task_vocab": options.task_vocab, "branch": options.branch, "changed": options.changed,
                 "best_possible_loss": round(math.log(options.branch), 4), "max_length": length,
                 "batch_size": rows, "eval_rows": options.eval_rows},
        "lora": {"rank": options.rank, "alpha": options.alpha, "learning_rate": options.learning_rate,
                 "steps": options.steps, "tile_size_4bit": options.tile_size, "target": PROJECTIONS},
        "pretrain": None if pretrain is None else {
            "steps": options.pretrain_steps, "learning_rate": options.pretrain_learning_rate,
            "final_train_loss": pretrain["final_train_loss"], "eval_loss_task_a": round(float_loss_a, 4),
            "eval_loss_task_b": round(float_loss_b, 4)},
        "sides": results,
        "base_bytes_over_float": {side: {
            key: round(entry["base_bytes"]["projections"][key] / float_bytes["projections"][key], 4)
            for key in ("nbytes", "on_device_bytes", "packed_bytes")} for side, entry in results.items()}
        if float_bytes else None,
        "qwix_patch": QWIX_PATCH, "compat": compat,
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
    }
    print_table(result)
    return emit(result, options.out)


def print_table(result: dict[str, Any]) -> None:
    header = ("side", "base bytes (nbytes)", "on device", "packed", "proj packed / f32", "max|dlogit| init",
              "train loss", "eval loss", "on float base", "step peak est.", "step s")
    rows = [header]
    for side, entry in result["sides"].items():
        ratio = (result["base_bytes_over_float"] or {}).get(side, {})
        rows.append((side, str(entry["base_bytes"]["nbytes"]), str(entry["base_bytes"]["on_device_bytes"]),
                     str(entry["base_bytes"]["packed_bytes"]), str(ratio.get("packed_bytes", "")),
                     f"{entry['init']['max_abs_logit_diff_vs_float_base']:.4g}", str(entry["final_train_loss"]),
                     str(entry["eval_loss"]), str(entry["merge"]["adapters_on_float_base_eval_loss"]),
                     str((entry["step_memory"] or {}).get("peak_estimate_bytes")), str(entry["step_seconds"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
