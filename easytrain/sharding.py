"""Device mesh and shardings: logical parameter axes mapped onto mesh axes by rules.

Models annotate every parameter with logical axis names (`"embed"`, `"mlp"`, ...). A rule table maps
each logical name to a mesh axis (or to nothing: replicated). The optimizer state follows the
parameters; batches are split over the data-parallel axes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from easytrain.errors import ArgumentError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LogicalRules = Sequence[tuple[str, Any]]

# Logical axis -> mesh axis. Sizes of 1 make a rule a no-op, so one table serves pure data
# parallel, FSDP and FSDP + tensor parallel alike.
DEFAULT_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
)


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill the one `-1` axis with the devices left over; check the product matches."""
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ArgumentError(f"{unknown[1]}_size", "only one mesh axis may be -1.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:
            raise ArgumentError(f"{unknown[0]}_size", f"{num_devices} devices are not divisible by the other "
                                f"axes' product {known}; choose sizes whose product divides {num_devices}.")
        sizes = {**sizes, unknown[0]: num_devices // known}
    if math.prod(sizes.values()) != num_devices:
        raise ArgumentError("data_parallel_size", f"mesh {sizes} needs {math.prod(sizes.values())} devices but "
                            f"{num_devices} are available; set one size to -1 or make the product {num_devices}.")
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: LogicalRules = DEFAULT_RULES) -> P:
    """Map logical names to mesh axes, replicating any dimension the mesh axis does not divide."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        size = math.prod(mesh.shape[n] for n in names)
        if not names or size == 1 or dim % size:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return P(*spec)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedShardings for every parameter, as a pure dict matching `nnx.to_pure_dict(params)`."""

    def one(variable: nnx.Variable) -> NamedSharding:
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        axes = variable.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules))

    shardings = jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, abstract_params: Any,
                        params_sharding: Any, mesh: Mesh) -> Any:
    """Optimizer moments take their parameter's sharding; anything else (counts, factored rows) is replicated."""
    replicated = NamedSharding(mesh, P())

    def follow(leaf, param, sharding):
        return sharding if getattr(leaf, "shape", None) == param.shape else replicated

    mapped = optax.tree_map_params(tx, follow, abstract_opt_state, abstract_params, params_sharding,
                                   transform_non_params=lambda _: replicated)
    return jax.tree.map(lambda x: x if isinstance(x, NamedSharding) else replicated, mapped,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the data-parallel axes, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[name] for name in BATCH_AXES)
