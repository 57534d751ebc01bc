"""What compiling a model's initialisation costs, against depth, and how much of it is random numbers.

    python -m benchmarks.init_compile [--quick] [--depths 4,8,16] [--hidden 2048] [--vocab 4096] [--repeats 2]
                                      [--fresh_depths 8,16,32] [--fresh_hidden 1024] [--out FILE]

A fresh run's state is built inside one jitted program (`easytrain.placement.create_state`), so before the
first step the trainer compiles that program once; on a GPU the first H200 run did not get past compiling it
for `llama-3b` in 200 s (docs/benchmarks.md, "GPU"). This lowers and compiles a Llama's initialisation
(`nnx.state` of the freshly built model, as `create_state` traces it; nothing is run, so no weight is
allocated) at each depth, four ways, round-robin over `--repeats`:

- `draws`: the model as it is, every weight a normal draw from its own key (`easytrain.models.layers._normal`);
- `keys_only`: each weight filled from its key's first word instead: flax's `Rngs` still derives one key per
  weight (a threefry hash), no draw;
- `no_random`: zeros, neither;
- `stacked`: the model's draws with its layers built stacked (`scan_layers`): one vmapped build of one layer
  (`easytrain.models.scan.build_layers`, the same weights), so the program does not grow with depth.

Reported per depth and way: median seconds to lower and to compile, the fusions in the compiled program, and
the compile seconds each added layer costs (a line through the depths). Width defaults to Llama 3.2 1B's
(hidden 2048, SwiGLU 8192, 32 heads, 8 key/value heads), the vocabulary kept small so the embedding does not
dominate. On a 2-core Zen 4, at 16 layers: 7.29 s with draws, 2.14 s keys only, 0.09 s without random
numbers, 1.57 s stacked (docs/benchmarks.md, "Initialisation compile").
Then, at `--fresh_depths` (width `--fresh_hidden`: the optimizer state of deeper 2048-wide models would not fit
this machine's memory), the whole way from nothing to a placed fresh train state (AdamW) of the unrolled model,
each in a fresh child process (`--repeats`, alternating; seconds and peak RSS):

- `one_program`: `easytrain.placement.create_state`, the layers built one by one inside the state's one program
  (the trainer until 2026-12-04);
- `stacked_then_layout`: what the trainer does now: the module initialised by one program with its layers
  stacked (`placement.initialise_module`), unstacked outside it one weight at a time, then `place_module`.
  At 32 layers: 32.3 s and 8.9 GiB one program, 10.5 s and 6.1 GiB the trainer's way (the same doc section);
- `frozen_builder`: a frozen entry built by a function, as the EMA of docs/custom_trainer.md is
  (`nnx.state(create_module(), nnx.Param)`), placed by `easytrain.frozen.place_frozen` with its layers drawn
  one by one in its program (the trainer until 2026-12-04);
- `frozen_builder_stacked`: the same with `stacked`, as the trainer places it now: drawn as one vmapped layer,
  unstacked outside the program.

Prints one JSON line. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from typing import Any, Callable, Iterator
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx

from benchmarks.report import child_json, emit, fill_defaults, relaunch_like_the_command
from easytrain import placement
from easytrain.frozen import Frozen, place_frozen
from easytrain.models import LlamaForCausalLM, init_model, layers
from easytrain.sharding import DEFAULT_RULES, make_mesh

PROFILES = {"full": dict(depths="4,8,16", hidden=2048, vocab=4096, repeats=2, fresh_depths="8,16,32",
                         fresh_hidden=1024),
            "quick": dict(depths="2,3", hidden=64, vocab=256, repeats=1, fresh_depths="2,3", fresh_hidden=64)}
FRESH_WAYS = ("one_program", "stacked_then_layout", "frozen_builder", "frozen_builder_stacked")


def _keys_only(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    return jnp.full(shape, jax.random.key_data(rngs.params())[0], dtype)


def _no_random(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    return jnp.zeros(shape, dtype)


#: Way -> (the weight initialiser it traces with, None: the model's own; whether the layers are built stacked).
WAYS: dict[str, tuple[Callable[..., jax.Array] | None, bool]] = {
    "draws": (None, False), "keys_only": (_keys_only, False), "no_random": (_no_random, False),
    "stacked": (None, True)}


def llama(depth: int, hidden: int, vocab: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                    num_hidden_layers=depth, num_attention_heads=max(1, hidden // 64),
                                    num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=True)


def compile_once(config: transformers.LlamaConfig, way: str) -> dict[str, float]:
    """Lower and compile the initialisation of `config` with `way`'s initialiser (not run)."""

    initialiser, stacked = WAYS[way]
    with mock.patch.object(layers, "_normal", initialiser or layers._normal):
        started = time.perf_counter()
        lowered = jax.jit(lambda: nnx.state(init_model(config, scan_layers=stacked))).lower()
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
    return {"lower": lowered_at - started, "compile": done - lowered_at,
            "fusions": compiled.as_text().count(" fusion(")}


class EMABuilder:
    """An EMA's frozen entry as docs/custom_trainer.md builds it, `nnx.state(create_module(), nnx.Param)`, with a
    `create_module` that builds its layers stacked inside `stacked()`, as the trainer's does."""

    def __init__(self, config: transformers.LlamaConfig):
        self.config, self.initialising = config, False

    @contextlib.contextmanager
    def stacked(self) -> Iterator[None]:
        self.initialising = True
        try:
            yield
        finally:
            self.initialising = False

    def __call__(self) -> nnx.State:
        return nnx.state(LlamaForCausalLM(self.config, rngs=nnx.Rngs(0), scan_layers=self.initialising), nnx.Param)


def fresh_state(config: transformers.LlamaConfig, way: str) -> dict[str, float]:
    """Seconds from nothing to a placed fresh AdamW train state of `config`'s unrolled model (or, for the frozen
    ways, to its EMA entry), `way`'s way, and the process's peak RSS (run in a process of its own)."""
    mesh, tx = make_mesh(), optax.adamw(1e-3)
    started = time.perf_counter()
    if way == "one_program":
        state, _ = placement.create_state(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)), tx, seed=0, mesh=mesh)
    elif way.startswith("frozen_builder"):
        build = EMABuilder(config)
        placed = place_frozen({"ema": Frozen(build, checkpoint=True)}, mesh, DEFAULT_RULES,
                              stacked=build.stacked if way == "frozen_builder_stacked" else None)
        state = placed.values
    else:
        module = placement.initialise_module(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0), scan_layers=True),
                                             mesh=mesh)
        module.scan_layers = False
        state, _ = placement.place_module(module, tx, seed=0, mesh=mesh, copy=False)
    jax.block_until_ready(state)
    return {"seconds": time.perf_counter() - started,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def fresh_states(options: argparse.Namespace) -> dict[str, Any]:
    """`fresh_state` per depth and way, each in a child process, alternating over `--repeats`."""
    depths = [int(d) for d in options.fresh_depths.split(",")]
    runs: dict[tuple[int, str], list[dict[str, float]]] = {(d, w): [] for d in depths for w in FRESH_WAYS}
    for _ in range(options.repeats):
        for depth in depths:
            for way in FRESH_WAYS:
                runs[depth, way].append(child_json("benchmarks.init_compile", "--fresh_child", way, "--depths",
                                                   str(depth), "--hidden", str(options.fresh_hidden), "--vocab",
                                                   str(options.vocab)))
    rows = {str(depth): {way: {key: statistics.median(r[key] for r in runs[depth, way])
                               for key in ("seconds", "peak_rss_gib")} for way in FRESH_WAYS} for depth in depths}
    deepest = rows[str(max(depths))]
    return {"hidden": options.fresh_hidden, "depths": rows,
            **{f"{new}_over_{old}": {key: deepest[new][key] / deepest[old][key] for key in ("seconds", "peak_rss_gib")}
               for new, old in (("stacked_then_layout", "one_program"), ("frozen_builder_stacked", "frozen_builder"))}}


def per_layer(depths: list[int], seconds: list[float]) -> float | None:
    """Slope of compile seconds against depth (least squares); None with fewer than two depths."""
    return float(np.polyfit(depths, seconds, 1)[0]) if len(set(depths)) > 1 else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny widths and depths: a smoke run")
    parser.add_argument("--depths", help="comma-separated layer counts (default 4,8,16; --quick 2,3)")
    for name in ("hidden", "vocab", "repeats"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--fresh_depths", help="comma-separated layer counts of the fresh-state runs (default 8,16,32)")
    parser.add_argument("--fresh_hidden", type=int, help="width of the fresh-state runs (default 1024)")
    parser.add_argument("--fresh_child", choices=FRESH_WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the JSON result to this file")
    options = parser.parse_args(argv)
    fill_defaults(options, PROFILES["quick" if options.quick else "full"])
    depths = [int(d) for d in options.depths.split(",")]
    if options.fresh_child:
        return emit(fresh_state(llama(depths[0], options.hidden, options.vocab), options.fresh_child), None)
    compile_once(llama(1, 64, 256), "draws")  # the process's first compile pays XLA's warm-up: untimed
    runs: dict[tuple[int, str], list[dict[str, float]]] = {(d, w): [] for d in depths for w in WAYS}
    for _ in range(options.repeats):
        for depth in depths:
            for way in WAYS:
                runs[depth, way].append(compile_once(llama(depth, options.hidden, options.vocab), way))
    rows = {str(depth): {way: {"lower_seconds": statistics.median(r["lower"] for r in runs[depth, way]),
                               "compile_seconds": statistics.median(r["compile"] for r in runs[depth, way]),
                               "fusions": runs[depth, way][0]["fusions"]} for way in WAYS} for depth in depths}
    slopes = {way: per_layer(depths, [rows[str(d)][way]["compile_seconds"] for d in depths]) for way in WAYS}
    deepest = rows[str(max(depths))]
    result = {
        "benchmark": "init_compile", "hidden": options.hidden, "vocab": options.vocab, "repeats": options.repeats,
        "backend": jax.default_backend(), "depths": rows, "compile_seconds_per_layer": slopes,
        # At the deepest depth: the share of the compile that random numbers cost, and the part of it that is
        # deriving one key per weight.
        "random_share_of_compile": 1 - deepest["no_random"]["compile_seconds"] / deepest["draws"]["compile_seconds"],
        "keys_share_of_compile": ((deepest["keys_only"]["compile_seconds"] - deepest["no_random"]["compile_seconds"])
                                  / deepest["draws"]["compile_seconds"]),
        # At the deepest depth: the stacked build's compile over the one-layer-at-a-time build's.
        "stacked_over_draws": deepest["stacked"]["compile_seconds"] / deepest["draws"]["compile_seconds"],
        "fresh_state": fresh_states(options),
    }
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
