"""Model FLOPs and hardware peak FLOP/s, for model FLOP utilisation (`mfu`).

Model FLOPs are counted from the architecture, not measured (the PaLM convention, appendix B): a
training step costs 6 FLOPs per trained matmul weight per token (2 forward, 2 for the gradient of its
input, 2 for its own gradient) plus 12 * layers * attention width * attended length per token for the
score and value products (no discount for the causal mask). A frozen weight (the base under LoRA) has
no gradient of its own: 4 FLOPs per token. So `mfu` compares runs on the same model whatever the
kernels do, and a LoRA run is not credited with weight gradients it never computes.

The peak is a table of dense bf16 peaks keyed by `jax.Device.device_kind`. A CPU has no table entry:
its peak is a float32 matmul rate measured once per process, and says so in its `source`.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from easytrain.models.families import features_of, head_dim_of

logger = logging.getLogger("easytrain")

#: Dense (not sparse) bf16 peak FLOP/s of one device, first `device_kind` substring match wins
#: (matched lower-case, so more specific names come first). Vendor datasheets.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h200 nvl", 835e12),
    ("h100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("h200", 989e12),  # also GH200
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
)
MEASURED_CPU_SOURCE = "measured cpu matmul (float32)"


#: Last path names of the parameters that multiply activations in a Llama-family module: the projections and
#: output head (`kernel`) and low-rank adapters. The embedding is a lookup unless it doubles as the head.
MATMUL_WEIGHT_NAMES = ("kernel", "lora_a", "lora_b")
TIED_HEAD_NAME = "embedding"


class MatmulWeights(NamedTuple):
    """Matmul weights of a module, split by whether the run computes their gradient."""

    trained: int
    frozen: int


class PeakFlops(NamedTuple):
    """Peak FLOP/s of every device of the run together, and where the number comes from."""

    flops_per_second: float
    source: str


# ----------------------------------------------------------------------------- model FLOPs
def matmul_params(config: Any) -> int:
    """Weights of a Llama-family model that multiply activations: attention and MLP projections of
    every layer and the output head (the tied embedding, if tied). The input embedding is a lookup
    and norms and biases are elementwise, so they are left out."""
    hidden, inner, head_dim = config.hidden_size, config.intermediate_size, head_dim_of(config)
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = 2 * hidden * q_width + 2 * hidden * kv_width  # q and o; k and v
    mlp = 3 * hidden * inner  # gate, up, down
    return config.num_hidden_layers * (attention + mlp) + hidden * config.vocab_size


def attention_flops_per_token(config: Any, seq_len: int) -> int:
    """Training FLOPs per token of the score (QK^T) and value (AV) products: 12 * width * attended
    length per layer, a sliding-window layer attending to at most its window."""
    width = config.num_attention_heads * head_dim_of(config)
    return sum(12 * width * min(seq_len, window or seq_len) for window in features_of(config).windows)


def matmul_weights(module: nnx.Module, trainable: nnx.filterlib.Filter, tied: bool) -> MatmulWeights:
    """`module`'s matmul weights (`MATMUL_WEIGHT_NAMES`, and the embedding when `tied` makes it the output head),
    split by the run's `trainable` filter: under LoRA the adapters (and a trained head) against the frozen base.
    Reads shapes only, so it works on abstract or donated arrays."""
    trained_paths = {path for path, _ in nnx.to_flat_state(nnx.state(module, trainable))}
    names = MATMUL_WEIGHT_NAMES + ((TIED_HEAD_NAME,) if tied else ())
    counts = {True: 0, False: 0}
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if path[-1] in names:
            counts[path in trained_paths] += int(np.prod(np.shape(variable.value)))
    return MatmulWeights(trained=counts[True], frozen=counts[False])


def training_flops_per_token(config: Any, seq_len: int, weights: MatmulWeights | None = None) -> int:
    """Model FLOPs of one training token (forward and backward) at sequence length `seq_len`: 6 per trained
    matmul weight, 4 per frozen one (`weights`, from `matmul_weights`; None: every weight of `config` trained)."""
    weights = weights or MatmulWeights(trained=matmul_params(config), frozen=0)
    return 6 * weights.trained + 4 * weights.frozen + attention_flops_per_token(config, seq_len)


# ----------------------------------------------------------------------------- hardware peak
def table_peak(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind, or None if the table does not know it."""
    kind = device_kind.lower()
    return next((peak for needle, peak in PEAK_BF16_FLOPS if needle in kind), None)


@functools.cache
def measured_cpu_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 `size` x `size` matmul on the CPU, the best of `repeats` runs.

    Measured once per process (cached), in a fraction of a second. A busy CPU measures low, and the
    `mfu` of a run on that process reads high.
    """
    device = jax.local_devices(backend="cpu")[0]
    operand = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(operand).block_until_ready()  # compile and warm up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(operand).block_until_ready()
        seconds.append(time.perf_counter() - started)
    return 2 * size**3 / max(min(seconds), 1e-9)


@functools.cache
def hardware_peak() -> PeakFlops | None:
    """Peak FLOP/s of all devices of this run, or None for an accelerator missing from the table.

    CPU "devices" of one process share its cores, so a CPU run's peak is one measured rate per process.
    Cached: looked up (or measured) once per process, and logged then.
    """
    device = jax.devices()[0]
    if device.platform == "cpu":
        peak = PeakFlops(measured_cpu_matmul_flops() * jax.process_count(), MEASURED_CPU_SOURCE)
    elif (per_device := table_peak(device.device_kind)) is not None:
        peak = PeakFlops(per_device * jax.device_count(), f"{device.device_kind} bf16 peak (table)")
    else:
        logger.warning("no peak FLOP/s known for device kind %r: mfu is not logged (add it to "
                       "easytrain.flops.PEAK_BF16_FLOPS)", device.device_kind)
        return None
    logger.info("mfu is relative to %.4g FLOP/s: %s", peak.flops_per_second, peak.source)
    return peak
