"""Greedy generation speed: KV-cache `generate` vs re-running the whole buffer for every token, and
`generate` on the same model with its layers stored stacked (`scan_layers`: decoded as one scan).

    python -m benchmarks.generation [--batch 8] [--prompt 64] [--new 64] [--layers 4] [--repeats 3]

The 6.3M-parameter Llama of `benchmarks/overhead.py` (`--layers` deep), random weights, no EOS (every
row generates `--new` tokens). Each side is compiled first (timed separately), then run `--repeats` times;
the median wall time gives new tokens per second. Every side must produce the same tokens. The compiled
scratch memory of both cached loops is reported too. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from easytrain.generation import GenerationConfig, _generate, generate, pad_prompts  # noqa: E402
from easytrain.models import init_model  # noqa: E402
from benchmarks.report import relaunch_like_the_command  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)


@functools.partial(jax.jit, static_argnames=("new",))
def no_cache_greedy(graphdef, params, rest, ids_BL, lengths_B, new: int):
    """The baseline: a right-padded `[B, L + new]` buffer, fully re-run for each new token."""
    model = nnx.merge(graphdef, params, rest)
    rows, slots_S = jnp.arange(ids_BL.shape[0]), jnp.arange(ids_BL.shape[1])

    def body(t, ids_BS):
        mask_BS = (slots_S[None, :] < (lengths_B + t)[:, None]).astype(jnp.int32)
        logits_BSV = model(ids_BS, attention_mask_BT=mask_BS)
        return ids_BS.at[rows, lengths_B + t].set(jnp.argmax(logits_BSV[rows, lengths_B + t - 1], axis=-1))

    ids_BL = jax.lax.fori_loop(0, new, body, ids_BL)
    return jnp.take_along_axis(ids_BL, lengths_B[:, None] + jnp.arange(new)[None, :], axis=1)


def timed(fn, repeats: int) -> tuple[np.ndarray, float, float]:
    """Result, first-call seconds (compile + run) and median seconds of the next `repeats` calls."""
    start = time.perf_counter()
    out = np.asarray(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(fn())
        times.append(time.perf_counter() - start)
    return out, first, statistics.median(times)


def scratch_bytes(model: nnx.Module, ids_BL: np.ndarray, mask_BL: np.ndarray, new: int) -> int:
    """Scratch memory of `generate`'s compiled loop (beyond the weights and inputs it is given)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lowered = _generate.lower(graphdef, params, rest, jnp.asarray(ids_BL), jnp.asarray(mask_BL), jax.random.key(0),
                              config=GenerationConfig(max_new_tokens=new))
    return lowered.compile().memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = init_model(transformers.LlamaConfig(**{**CONFIG, "num_hidden_layers": args.layers}), seed=0)
    prompts = np.random.default_rng(0).integers(1, CONFIG["vocab_size"], (args.batch, args.prompt)).tolist()
    ids_BL, mask_BL = pad_prompts(prompts, pad_id=0)
    cached, cached_first, cached_s = timed(
        lambda: generate(model, ids_BL, mask_BL, max_new_tokens=args.new), args.repeats
    )
    unrolled_scratch = scratch_bytes(model, ids_BL, mask_BL, args.new)
    model.scan_layers = True
    scanned, scanned_first, scanned_s = timed(
        lambda: generate(model, ids_BL, mask_BL, max_new_tokens=args.new), args.repeats
    )
    scanned_scratch = scratch_bytes(model, ids_BL, mask_BL, args.new)
    model.scan_layers = False
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    buffer_BS = np.pad(ids_BL, ((0, 0), (0, args.new)))
    lengths_B = np.full((args.batch,), args.prompt, np.int32)
    plain, plain_first, plain_s = timed(
        lambda: no_cache_greedy(graphdef, params, rest, buffer_BS, lengths_B, args.new), args.repeats
    )
    tokens = args.batch * args.new
    print(json.dumps({
        "benchmark": "generation", "device": jax.devices()[0].platform,
        "params": sum(p.size for p in jax.tree.leaves(params)), "layers": args.layers, "batch": args.batch,
        "prompt": args.prompt, "new_tokens": args.new, "same_tokens": bool((cached == plain).all()),
        "same_tokens_scan_layers": bool((scanned == cached).all()),
        "cache_tokens_per_second": round(tokens / cached_s, 1),
        "no_cache_tokens_per_second": round(tokens / plain_s, 1),
        "speedup": round(plain_s / cached_s, 2),
        "cache_first_call_seconds": round(cached_first, 3), "no_cache_first_call_seconds": round(plain_first, 3),
        "scan_layers_tokens_per_second": round(tokens / scanned_s, 1),
        "scan_layers_over_unrolled_tokens_per_second": round(cached_s / scanned_s, 3),
        "scan_layers_first_call_seconds": round(scanned_first, 3),
        "scratch_bytes": {"unrolled": unrolled_scratch, "scan_layers": scanned_scratch},
    }))


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
