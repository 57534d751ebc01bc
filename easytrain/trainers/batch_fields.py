"""A batch as `collate` returns it, checked field by field before it reaches a device: every field an array of one
shape, none a device cannot hold (strings, objects, rows of different lengths), each named with its fix."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from easytrain import sharding
from easytrain.data.batch_checks import check_is_batch
from easytrain.data.errors import DataError


def check_collated(host_batch: Mapping[str, Any], host_only: Sequence[str]) -> dict[str, Any]:
    """The device fields of a batch `collate` returned, each an array (with a shape and dtype); a list, a scalar or
    another object is named with its fix instead of failing as an attribute error inside the tracing."""
    check_is_batch(host_batch)
    fields = {key: value for key, value in host_batch.items() if key not in host_only}
    for key, value in fields.items():
        if not (hasattr(value, "shape") and hasattr(value, "dtype")) or not np.ndim(value):
            shape = f" of shape {np.shape(value)}" if hasattr(value, "shape") else ""
            raise TypeError(f"collate returned field {key!r} as a {type(value).__name__}{shape}; every field must be "
                            "a numpy array with one row per example: wrap it, e.g. np.asarray(...) (or list it in "
                            "host_only_fields to keep it on the host).")
    check_batch_fields(fields, host_only)
    return fields


def to_device_batch(host_batch: Mapping[str, Any], mesh: Any, host_only: Sequence[str]) -> dict[str, jax.Array]:
    """This host's rows as global arrays, the `host_only` fields left out; a field no device can hold is named."""
    fields = {key: value for key, value in host_batch.items() if key not in host_only}
    try:
        return sharding.to_global_arrays(fields, sharding.batch_sharding(mesh))
    except TypeError:
        check_batch_fields(fields, host_only)
        raise


def check_batch_fields(fields: Mapping[str, Any], host_only: Sequence[str]) -> None:
    """Name the batch field a device cannot hold (strings, objects) and the way to keep it on the host; a field of
    numeric rows held as objects (rows of different lengths, as a `datasets.Dataset` gives them) is told to pad."""
    for key, value in fields.items():
        dtype = np.asarray(value).dtype
        if dtype.kind == "O" and (shapes := numeric_row_shapes(value)):
            if len(shapes) > 1:
                raise DataError(f"batch field {key!r} holds rows of different shapes ({', '.join(shapes[:3])}"
                                f"{', ...' * (len(shapes) > 3)}), but a device batch needs one shape: pad them in "
                                "collate to a fixed length and pass a mask field the loss applies (docs/"
                                "custom_trainer.md, 'Static shapes').")
            raise DataError(f"batch field {key!r} holds its numeric rows of shape {shapes[0]} as an object array, "
                            f"which a device cannot hold; stack them in collate, e.g. np.stack(rows[...]).")
        if dtype.kind in "OSUV":
            raise TypeError(f"batch field {key!r} has dtype {dtype}, which a device cannot hold; drop it in collate, "
                            f"or list it in the trainer's host_only_fields (now {tuple(host_only)}) to keep it on "
                            "the host.")


def numeric_row_shapes(value: Any) -> list[str]:
    """The distinct shapes of the rows of an object array, in order of first sight, if every row is a number or an
    array of numbers; else none (strings, dicts, rows ragged within themselves)."""
    try:
        rows = [np.asarray(row.tolist() if getattr(row, "dtype", None) == object else row) for row in value]
    except ValueError:
        return []
    return list(dict.fromkeys(str(row.shape) for row in rows)) if all(row.dtype.kind in "biuf" for row in rows) else []
