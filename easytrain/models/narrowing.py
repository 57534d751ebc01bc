"""Exports and loads into a narrower float dtype refuse weights beyond its range instead of making them inf.

One rule for both: a cast to a dtype of smaller range (`narrows`) makes a finite value inf exactly where numpy's
cast of it does (`becomes_inf`); such a tensor is refused, naming it, its largest |value| and a dtype that holds it
(`check_range`), before any file is written or any model returned. Float16 keeps 10 mantissa bits but only 5
exponent bits: its largest finite value is 65504, and a float32 or bfloat16 weight of 65520 or more casts to inf
(``numpy``, ``torch`` and transformers' ``model.to(torch.float16)`` alike, without a word). Bfloat16's largest is
about 3.390e38, and float32 values from about 3.396e38 (2**128 - 2**119) round past it to inf. Clipping would write
a model other than the one trained. An export (float32 or float64 to bfloat16 or float16, bfloat16 to float16,
float64 to float32) takes each written tensor's largest finite |value| first (`largest_finite`, one reduction per
parameter); a load tests each block's cast to `param_dtype` by its bits (`cast_overflowed`), and refuses, once every
block is read, what any process found (`refuse_loaded`). A value the cast only rounds (finite to finite) passes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from easytrain.listing import listed
from easytrain.models.hf_io import CheckpointError

_SHOWN = 8


def becomes_inf(peak: float, dtype: Any) -> bool:
    """Whether numpy's cast of `peak` to `dtype` is inf, the cast a load or an export makes: rounding is monotone,
    so a tensor's largest |value| tells for all of them. No threshold: float16's is 65520 (half a step past 65504,
    ties to even), but float64 reaches bfloat16 through float32 (ml_dtypes), so a float64 just under 2**128 - 2**119
    rounds to it first, and then to inf."""
    with np.errstate(over="ignore"):
        return bool(np.isinf(np.asarray(abs(float(peak)), np.float64).astype(dtype)))


def narrows(target: Any, source: Any) -> bool:
    """Whether casting `source`-dtype values to `target` can make a finite value inf: `target`'s range is smaller."""
    return float(jnp.finfo(target).max) < float(jnp.finfo(source).max)


def narrows_value(stored: Any, value: Any) -> bool:
    """Whether writing `value` (an array) as `stored` can make a finite value inf (`narrows`)."""
    return narrows(stored, value.dtype)


Axes = tuple[int, ...] | None
#: Every process's copy of an array, stacked in process order (`multihost_utils.process_allgather`).
Gather = Callable[[np.ndarray], np.ndarray]
#: Each load dtype's bits as signed and unsigned integers of its width, and its exponent bits: all set is inf or NaN.
_EXPONENT_BITS = {np.dtype(np.float16): (np.int16, np.uint16, 0x7C00),
                  np.dtype(jnp.bfloat16): (np.int16, np.uint16, 0x7F80),
                  np.dtype(np.float32): (np.int32, np.uint32, 0x7F800000)}


def cast_overflowed(cast: np.ndarray) -> bool:
    """Whether a cast (contiguous) array holds an inf or NaN, read from its bits, so that only a block holding one
    is looked at again. Two integer maxima and no temporary: as signed integers only a positive inf/NaN reaches the
    exponent bits, as unsigned ones only a negative inf/NaN reaches the sign and exponent bits (2.1-2.7 ms per 16.7M
    values on a CPU core, against 10-17 ms for testing each value's exponent bits, and 15-18 ms for a float32 block's
    cast to bfloat16 itself)."""
    if cast.size == 0:
        return False
    if cast.dtype not in _EXPONENT_BITS:
        return not bool(np.isfinite(cast).all())
    signed, unsigned, exponent = _EXPONENT_BITS[cast.dtype]
    sign = 1 << (8 * cast.dtype.itemsize - 1)
    return int(cast.view(signed).max()) >= exponent or int(cast.view(unsigned).max()) >= sign | exponent


def _allgather_float64(local: np.ndarray) -> np.ndarray:
    """`multihost_utils.process_allgather` of float64 values, sent as their bits: JAX holds float64 as float32
    unless x64 is on, where a peak of 1e300 would arrive as inf."""
    bits = np.ascontiguousarray(local, np.float64).view(np.uint32)
    return np.asarray(multihost_utils.process_allgather(bits)).view(np.float64)


def every_process_gather() -> Gather | None:
    """An exact float64 `multihost_utils.process_allgather` where several processes load, else None."""
    return _allgather_float64 if jax.process_count() > 1 else None


def agreed_peaks(peaks: Mapping[str, float], names: Sequence[str], gather: Gather | None) -> dict[str, float]:
    """Each of `names`' largest |value| over every process's `peaks` (of the blocks it read; absent: within range):
    a process refusing alone what only its blocks hold would leave the others to wait in their next collective.
    Every process calls it with the same `names`; `gather`: None for one process."""
    local = np.array([peaks.get(name, 0.0) for name in names], np.float64)
    if gather is not None and len(local):
        local = np.asarray(gather(local)).reshape(-1, len(local)).max(axis=0)
    return {name: float(peak) for name, peak in zip(names, local) if peak}


@functools.partial(jax.jit, static_argnames=("axes", "finite"))
def _device_peak(value: jax.Array, axes: Axes, finite: bool) -> jax.Array:
    magnitude = jnp.abs(value)
    if finite:
        return jnp.max(magnitude, axis=axes, where=jnp.isfinite(value), initial=0)
    return jnp.max(magnitude, axis=axes)


def _peak(value: Any, axes: Axes, finite: bool) -> Any:
    """The largest |value| over `axes` (all when None), of the finite entries only if `finite`: one fused
    reduction on the device for a ``jax.Array`` (no copy), but numpy's in place for one on a single CPU device (no
    compile per weight shape: 0.2-0.7 s the first time in a process on a 58.5M-parameter model). Kept in the
    value's dtype, exact: a float64 65519.999 casts to float16's 65504, but to float32 it rounds to 65520, which
    float16 rounds to inf."""
    if isinstance(value, jax.Array) and not _on_one_cpu(value):
        return _device_peak(value, axes, finite)
    array = np.asarray(value)
    if finite:
        return np.max(np.abs(array), axis=axes, where=np.isfinite(array), initial=0)
    with np.errstate(invalid="ignore"):  # a NaN makes the peak NaN: taken again over the finite ones
        return np.maximum(np.max(array, axis=axes, initial=0), -np.min(array, axis=axes, initial=0))  # no temporary


def _on_one_cpu(value: jax.Array) -> bool:
    """Whether numpy reads `value`'s buffer in place: one CPU device of this process holds it whole."""
    devices = value.sharding.device_set
    return len(devices) == 1 and value.is_fully_addressable and next(iter(devices)).platform == "cpu"


def largest_finite(values: Sequence[tuple[Any, Axes]], to_host: Callable[[list[Any]], list[np.ndarray]]
                   ) -> list[np.ndarray]:
    """Each `(value, axes)`'s largest finite |value| over `axes`, on the host. A weight already inf or NaN is so
    in any dtype, and must not hide another's overflow; but a masked reduction ran up to 9x slower on XLA's CPU
    than a plain one (0.4 against 3.6 GB/s over a [32000, 512] float32 embedding, 2.1 against 3.5 over an
    [8, 1408, 512] stacked weight), so it is taken only where the plain peak is not finite.
    `to_host`: every value whole on this host (a collective where arrays span processes)."""
    peaks = to_host([_peak(value, axes, finite=False) for value, axes in values])
    again = [i for i, peak in enumerate(peaks) if not np.isfinite(peak).all()]  # the same on every process
    for i, peak in zip(again, to_host([_peak(*values[i], finite=True) for i in again]) if again else []):
        peaks[i] = peak
    return peaks


def check_ranges(peaks: Mapping[str, float], stored: Mapping[str, Any], what: str, field: str) -> None:
    """`check_range` of each tensor's peak (`peaks`, by name) against the dtype it is written in (`stored`)."""
    for dtype in sorted({np.dtype(stored[name]) for name in peaks}, key=str):
        check_range({name: peak for name, peak in peaks.items() if np.dtype(stored[name]) == dtype}, dtype, what,
                    field)


def check_range(peaks: Mapping[str, float], dtype: Any, what: str, field: str) -> None:
    """Refuses the tensors whose largest finite |value| (`peaks`, by name) `dtype` would hold as inf, naming them,
    their peaks and a dtype that holds them (or, where float32 does not, the checkpoint as the thing to fix)."""
    dtype = np.dtype(dtype)
    over = {name: float(peak) for name, peak in peaks.items() if becomes_inf(peak, dtype)}
    if not over:
        return
    names = sorted(over, key=lambda name: -over[name])
    shown = listed((f"{name}: largest |value| {over[name]:.6g}" for name in names), _SHOWN, sep="; ")
    raise CheckpointError(
        f"{field}='{dtype.name}' cannot hold {len(names)} tensor(s) of {what}, which would become inf "
        f"({dtype.name}'s largest value is {float(jnp.finfo(dtype).max):.6g}): {shown}. "
        f"{_wider(dtype, over[names[0]], field)}")


def _wider(dtype: np.dtype, peak: float, field: str) -> str:
    """The fix: a wider dtype that holds `peak`, or, beyond float32's range, the checkpoint."""
    holders = [name for name in ("bfloat16", "float32") if narrows(dtype, name) and not becomes_inf(peak, name)]
    if len(holders) == 2:
        return f"Pass {field}='bfloat16' (float32's range, half the bytes of float32) or {field}='float32'."
    if holders:
        return f"Pass {field}='{holders[0]}'."
    return (f"Not even float32 holds the largest (float32's largest value is {float(jnp.finfo(np.float32).max):.6g}): "
            "a weight this large is most likely damage; fix the checkpoint (or rescale it where it was made).")


def refuse_narrowed(peaks: Mapping[str, float], names: Sequence[str], stored: Mapping[str, Any], what: str,
                    field: str) -> None:
    """`check_ranges` on every process alike (each calls it with the same `names`, and `stored`: each name's
    dtype): the tensors any of them found past their dtype's range (`peaks`: this process's, by name)."""
    check_ranges(agreed_peaks(peaks, names, every_process_gather()), stored, what, field)


def refuse_loaded(peaks: Mapping[str, float], names: Sequence[str], dtype: Any) -> None:
    """`refuse_narrowed` of a load into `dtype` (`peaks`: of the blocks this process read, by stored name)."""
    refuse_narrowed(peaks, names, dict.fromkeys(names, dtype), "the checkpoint", "param_dtype")
