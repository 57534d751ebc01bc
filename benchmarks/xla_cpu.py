"""Where a training step's time goes on XLA:CPU, next to PyTorch on the same model, and what XLA's CPU flags change.

    python -m benchmarks.xla_cpu [--quick] [--repeats 5] [--flag_rounds 2] [--flag_sets a,b] [--out FILE]

Three measurements on the `benchmarks.versus_torch` Llama (batch 8 x 256, float32, AdamW):

1. **Phases, both frameworks, one process.** Forward (loss only), forward + backward, the AdamW update
   alone and the whole step, jitted in JAX (a plain NNX model) and eager in PyTorch (`transformers`'
   Llama), alternating call by call; the median milliseconds of each and the JAX / PyTorch time ratio.
2. **Operations of the JAX step.** The step traced with `jax.profiler` and XLA's per-kernel trace events
   (`--xla_cpu_enable_xprof_traceme`): kernel time summed over threads, grouped by what the kernel
   computes (the matmuls of the MLP, of the attention projections, of the attention scores and values, of
   the output head, and everything else), with each matmul group's FLOP/s from the compiled HLO's shapes.
3. **XLA CPU flags.** The same jitted step in a child process per flag set (flags only take effect before
   JAX starts), rounds interleaved; median tokens/s and the ratio to the default flags.

Prints one JSON line. Times depend on machine load; ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402

from benchmarks.report import child_json, emit, relaunch_like_the_command  # noqa: E402
from benchmarks.versus_torch import BATCH, CONFIG, LENGTH, LR, QUICK, WD, token_blocks  # noqa: E402

FLAG_SETS = {
    "default": "",
    "no_ynnpack_dots": "--xla_cpu_experimental_ynn_fusion_type=",
    "xnnpack_dots": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def jax_step_functions(config: dict, blocks: np.ndarray, batch: int) -> dict[str, Callable[[], Any]]:
    """Jitted forward, forward + backward, AdamW update and whole step of a plain NNX model, as thunks."""
    import jax
    import optax
    import transformers
    from flax import nnx

    from easytrain.models import init_model

    graphdef, params, rest = nnx.split(init_model(transformers.LlamaConfig(**config), seed=0), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx = optax.adamw(LR, weight_decay=WD)
    inputs, targets = blocks[:batch, :-1], blocks[:batch, 1:]

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def update(grads, opt_state, p):
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    def step(p, opt_state):
        grads = jax.grad(loss)(p)
        return update(grads, opt_state, p)

    # The update and the step donate the parameters and moments they replace, as every JAX training loop does
    # (PyTorch's optimizer updates in place): without donation each call also allocates and faults in a fresh
    # copy of the whole state, which no loop pays.
    forward, backward = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    update, step = jax.jit(update, donate_argnums=(1, 2)), jax.jit(step, donate_argnums=(0, 1))
    carry = {"params": params, "opt": tx.init(params)}
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, carry["opt"]))
    grads = backward(params)[1]

    def run_update() -> None:
        carry["params"], carry["opt"] = update(grads, carry["opt"], carry["params"])
        jax.block_until_ready(carry["params"])

    def run_step() -> None:
        carry["params"], carry["opt"] = step(carry["params"], carry["opt"])
        jax.block_until_ready(carry["params"])

    return {"forward": lambda: forward(carry["params"]).block_until_ready(),
            "forward_backward": lambda: jax.block_until_ready(backward(carry["params"])),
            "adamw": run_update, "step": run_step, "_compiled_step": lambda: step.lower(*shapes).compile()}


def torch_step_functions(config: dict, blocks: np.ndarray, batch: int) -> dict[str, Callable[[], Any]]:
    """The same phases in eager PyTorch on `transformers`' Llama (the model `transformers.Trainer` trains)."""
    import torch

    from benchmarks.versus_torch import torch_model

    model = torch_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    ids = torch.from_numpy(blocks[:batch, :-1].astype(np.int64))

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    def backward():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def step():
        backward()
        optimizer.step()

    backward()  # gradients exist for the update-only phase
    return {"forward": forward, "forward_backward": backward, "adamw": optimizer.step, "step": step}


def time_phases(options: argparse.Namespace, jax_side: dict[str, Callable[[], Any]],
                torch_side: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Median ms of each phase for each framework, called alternately; and JAX over PyTorch."""
    import torch

    sides = {"jax": jax_side, "torch": torch_side}
    phases = ("forward", "forward_backward", "adamw", "step")
    for functions in sides.values():  # compile and warm up
        for phase in phases:
            functions[phase]()
            functions[phase]()
    seconds: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for _ in range(options.repeats):
        for phase in phases:
            for side, functions in sides.items():
                started = time.perf_counter()
                functions[phase]()
                seconds[side, phase].append(time.perf_counter() - started)
    table = {phase: {side: round(1e3 * statistics.median(seconds[side, phase]), 2) for side in sides}
             for phase in phases}
    for row in table.values():
        row["jax_over_torch"] = round(row["jax"] / row["torch"], 4)
    return {"ms": table, "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- kernels
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w+)\((.*?)\)(.*)")


def dot_flops_by_kernel(hlo: str, config: dict) -> dict[str, tuple[float, str]]:
    """Kernel name -> (FLOPs of its dots, their group), for the entry's dots and fusions holding dots."""
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo.splitlines():
        if header := re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line):
            current = computations.setdefault("ENTRY" if line.startswith("ENTRY") else header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)

    def dots_in(lines: list[str], only: str | None = None) -> tuple[float, str]:
        """FLOPs and group of the dots among `lines` (of one computation), or of the dot named `only`."""
        shapes: dict[str, list[int]] = {}
        flops, group = 0.0, "other"
        for line in lines:
            if not (instruction := INSTRUCTION.match(line)):
                continue
            name, dims, op, operands, attributes = instruction.groups()
            shapes[name] = [int(d) for d in dims.split(",") if d]
            if op == "dot" and only in (None, name):
                lhs = shapes[operands.split(",")[0].strip().lstrip("%")]
                contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attributes).group(1)
                flops += 2 * float(np.prod(shapes[name])) * float(np.prod([lhs[int(i)] for i in contracted.split(",")]))
                group = dot_group(shapes[name], lhs, "lhs_batch_dims" in attributes, config)
        return flops, group

    found = {}
    entry = computations.get("ENTRY", [])
    for line in entry:
        if not (instruction := INSTRUCTION.match(line)):
            continue
        name, _, op, _, attributes = instruction.groups()
        if op == "fusion" and (called := re.search(r"calls=%([\w.\-]+)", attributes)):
            flops, group = dots_in(computations.get(called.group(1), []))
        elif op == "dot":
            flops, group = dots_in(entry, only=name)
        else:
            continue
        if flops:
            found[name] = (flops, group)
    return found


def dot_group(out: list[int], lhs: list[int], batched: bool, config: dict) -> str:
    """What a dot computes, told apart by its sizes (the config keeps vocab, MLP and hidden sizes distinct)."""
    if batched:
        return "attention scores and values"
    sizes = set(out) | set(lhs)
    if config["vocab_size"] in sizes:
        return "output head"
    if config["intermediate_size"] in sizes:
        return "MLP"
    return "attention projections"


def kernel_times(compiled: Any, run_step: Callable[[], Any], steps: int, config: dict) -> dict:
    """Per-kernel time of `steps` steps from a `jax.profiler` trace, grouped as in `dot_flops_by_kernel`."""
    import jax

    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(steps):
                run_step()
        profile = jax.profiler.ProfileData.from_file(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0])
    hlo = compiled.as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    kernels = set(re.findall(r"%([\w.\-]+) = ", entry))  # what the step runs, by the names events carry
    nanoseconds: collections.Counter = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in kernels:
                    nanoseconds[event.name] += event.duration_ns
    dots = dot_flops_by_kernel(hlo, config)
    groups: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"ms": 0.0, "gflop": 0.0})
    for kernel, ns in nanoseconds.items():
        flops, group = dots.get(kernel, (0.0, "everything else (elementwise, reductions, copies, gathers)"))
        groups[group]["ms"] += ns / 1e6 / steps
        groups[group]["gflop"] += flops / 1e9
    total = sum(g["ms"] for g in groups.values()) or 1.0
    return {group: {"ms_per_step": round(g["ms"], 2), "share": round(g["ms"] / total, 4),
                    **({"gflop_per_second": round(g["gflop"] / g["ms"] * 1e3, 1)} if g["gflop"] else {})}
            for group, g in sorted(groups.items(), key=lambda item: -item[1]["ms"])}


# ---------------------------------------------------------------------------------------------- flags
def flag_child(options: argparse.Namespace, config: dict, blocks: np.ndarray, batch: int) -> dict[str, Any]:
    """Tokens/s of the whole jitted step under the XLA_FLAGS this process started with."""
    step = jax_step_functions(config, blocks, batch)["step"]
    step(), step()
    started = time.perf_counter()
    for _ in range(options.flag_steps):
        step()
    return {"tokens_per_second": options.flag_steps * batch * (blocks.shape[1] - 1) / (time.perf_counter() - started)}


def sweep_flags(options: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, list[float]] = collections.defaultdict(list)
    names = ["default", *(name for name in options.flag_sets.split(",") if name and name != "default")]
    for r in range(options.flag_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG_SETS[name]}".strip()}
            child = child_json("benchmarks.xla_cpu", "--flag_child", "--flag_steps", str(options.flag_steps),
                               *(["--quick"] if options.quick else []), env=env)
            rates[name].append(child["tokens_per_second"])
    default = statistics.median(rates["default"])
    return {name: {"flags": FLAG_SETS[name], "tokens_per_second": round(statistics.median(v), 1),
                   "min": round(min(v), 1), "max": round(max(v), 1),
                   "over_default": round(statistics.median(v) / default, 4)} for name, v in rates.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trace_steps", type=int, default=3)
    parser.add_argument("--flag_rounds", type=int, default=2)
    parser.add_argument("--flag_steps", type=int, default=5)
    parser.add_argument("--flag_sets", default=",".join(FLAG_SETS), help=f"comma-separated, of {', '.join(FLAG_SETS)}")
    parser.add_argument("--flag_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    options = parser.parse_args(argv)
    config = {**CONFIG, **QUICK["config"]} if options.quick else CONFIG
    batch, length = (QUICK["batch"], QUICK["length"]) if options.quick else (BATCH, LENGTH)
    blocks = token_blocks(config["vocab_size"], batch, length)
    if options.flag_child:
        result = flag_child(options, config, blocks, batch)
        print(json.dumps(result))
        return result
    flags = sweep_flags(options)  # first: child processes see the machine before this one holds memory
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true".strip()
    jax_side = jax_step_functions(config, blocks, batch)
    phases = time_phases(options, jax_side, torch_step_functions(config, blocks, batch))
    kernels = kernel_times(jax_side["_compiled_step"](), jax_side["step"], options.trace_steps, config)
    result = {"benchmark": "xla_cpu", "config": config, "batch": batch, "length": length, "phases": phases,
              "kernels": kernels, "flags": flags, "load_average": list(os.getloadavg())}
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
