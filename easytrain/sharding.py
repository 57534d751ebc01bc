"""Device mesh and shardings: logical parameter axes mapped onto mesh axes by rules.

Models annotate every parameter with logical axis names (`"embed"`, `"mlp"`, ...). A rule table maps
each logical name to a mesh axis (or to nothing: replicated). The optimizer state follows the
parameters; batches are split over the data-parallel axes. Activations are pinned with the same
names and rules (`constrain`) wherever a step is traced under `with_activation_layout`.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
from typing import Any, Callable, Collection, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from easytrain.errors import ArgumentError, MeshError
from easytrain.indivisible import Dropped, warn_indivisible
from easytrain.listing import listed

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
MESH_FIELDS = {"data": "data_parallel_size", "fsdp": "fsdp_size", "tensor": "tensor_parallel_size"}  # the arguments
LogicalRules = Sequence[tuple[str, Any]]
logger = logging.getLogger("easytrain")

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
    """Fill the one `-1` axis with the devices left over; check each size is positive or -1 and the product matches.

    `data` at -1 (its default) means "the devices the other axes leave": when another axis is -1 too, that axis
    takes them all and `data` is 1, so `--fsdp_size -1` works alone. Two other axes at -1 are ambiguous.
    """
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise ArgumentError(MESH_FIELDS.get(name, name), f"must be a positive size or -1, got {size}.")
    given = {MESH_FIELDS.get(name, name): size for name, size in sizes.items() if size > 1}  # as the user gave them
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1 and "data" in unknown:
        sizes = {**sizes, "data": 1}
        unknown.remove("data")
    if len(unknown) > 1:
        fields = " and ".join(MESH_FIELDS.get(name, name) for name in unknown)
        raise ArgumentError(MESH_FIELDS.get(unknown[1], unknown[1]), f"only one of {fields} may be -1 (the "
                            "devices left over); give the others a size.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:  # known > 1, so some size the user gave is > 1
            product = " * ".join(f"{name}={size}" for name, size in given.items())
            product += f" = {known}" if len(given) > 1 else ""
            problem = (f"{product} needs {known} devices, but {num_devices} are available" if known > num_devices
                       else f"{num_devices} devices are not divisible by {product}")
            raise ArgumentError(max(given, key=given.get), f"{problem}; choose sizes whose product divides "
                                                           f"{num_devices}.")
        sizes = {**sizes, unknown[0]: num_devices // known}
    if math.prod(sizes.values()) != num_devices:
        shown = ", ".join(f"{MESH_FIELDS.get(name, name)}={size}" for name, size in sizes.items())
        raise ArgumentError("data_parallel_size", f"mesh {shown} needs {math.prod(sizes.values())} devices but "
                            f"{num_devices} are available; set one size to -1 or make the product {num_devices}.")
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default `jax.devices()`, ordered by process), laid out row-major:
    a tensor group is consecutive devices, so within a host, where its per-layer collectives are cheapest."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_mesh(mesh: Mesh) -> None:
    """Raise `MeshError` unless `mesh` has the axes `data`, `fsdp` and `tensor`, all of type `Auto`.

    easytrain's rules and batch layout name those three axes, and its steps let XLA propagate shardings
    (`with_sharding_constraint` on activations), which Explicit axes turn into assertions. Checked when the
    trainer is built, before any data or module exists.
    """
    fix = ("return easytrain.sharding.make_mesh(data, fsdp, tensor, devices=...) from configure_mesh, or a "
           f"jax.sharding.Mesh with the axis names {MESH_AXES} and axis_types=(AxisType.Auto,) * 3")
    for axis in MESH_AXES:
        if axis not in mesh.axis_names:
            raise MeshError(f"configure_mesh returned a mesh that lacks the axis {axis!r} (it has "
                            f"{', '.join(map(repr, mesh.axis_names))}); {fix}. Give unused axes size 1.")
    if other := sorted({str(t) for t in mesh.axis_types if t != AxisType.Auto}):
        raise MeshError(f"configure_mesh returned a mesh with {', '.join(other)} axes (jax.make_mesh makes Explicit "
                        f"ones by default); easytrain shards by propagation, which needs AxisType.Auto: {fix}.")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: LogicalRules = DEFAULT_RULES) -> P:
    """Map logical names to mesh axes, replicating any dimension the mesh axis does not divide (for an
    `easytrain.indivisible.BlockedAxis`, whose blocks it does not divide: heads are never split)."""
    return _resolve(logical_axes, shape, mesh, rules)[0]


def _resolve(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Any,
             rules: LogicalRules) -> tuple[P, list[Dropped]]:
    """`logical_to_spec`, and the dimensions it replicated because their mesh axes (size > 1) do not divide them:
    their length, or for a `BlockedAxis` their blocks, so no device holds part of a head."""
    table = dict(rules)
    used: set[str] = set()
    spec, dropped = [], []
    for name, dim in zip(logical_axes, shape):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        size = math.prod(mesh.shape[n] for n in names)
        blocks = getattr(name, "blocks", None)
        count = blocks if blocks and dim % blocks == 0 else dim
        if not names or size == 1 or count % size:
            if names and size > 1:
                dropped.append(Dropped(name, count, names, size))
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return P(*spec), dropped


_WARNED_AXES: set[str] = set()


def warn_unknown_axes(where: str, logical_axes: Sequence[str | None], rules: LogicalRules) -> None:
    """Warn once per logical axis name that no rule names (a typo such as 'hiden' would silently replicate the
    parameter); a name a rule maps to None is replicated on purpose and not warned about."""
    known = dict(rules)
    for name in logical_axes:
        if name is not None and name not in known and name not in _WARNED_AXES:
            _WARNED_AXES.add(name)
            logger.warning("parameter %s has the logical axis %r, which no partition rule names, so that dimension is "
                           "replicated; the rules name %s. Fix the name, or add a rule for it to partition_rules "
                           "(map it to None to replicate it on purpose).", where, name, ", ".join(map(repr, known)))


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedShardings for every parameter, as a pure dict matching `nnx.to_pure_dict(params)`."""
    params: list[tuple[str, P, int]] = []  # (path, spec, bytes) of each nnx.Param, for the warnings below
    dropped: list[tuple[str, int, Dropped]] = []  # (path, bytes, dimension) replicated as indivisible

    def one(path: Any, variable: nnx.Variable) -> NamedSharding:
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        axes = variable.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        where = jax.tree_util.keystr(path, simple=True, separator=".")
        warn_unknown_axes(where, axes, rules)
        spec, indivisible = _resolve(axes, value.shape, mesh, rules)
        if isinstance(variable, nnx.Param):
            nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
            params.append((where, spec, nbytes))
            dropped.extend((where, nbytes, dim) for dim in indivisible)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    explained = warn_indivisible(dropped, params, mesh, MESH_FIELDS)
    warn_unsharded_mesh_axes([(where, spec) for where, spec, _ in params], mesh, rules, explained)
    return nnx.to_pure_dict(shardings)


#: (mesh axis, its size, the parameters' paths) warned about in this process: a second trainer of a notebook or sweep
#: with another mesh or module is warned again, one set-up placing the same parameters again is not.
_WARNED_MESH_AXES: set[tuple[str, int, tuple[str, ...]]] = set()


def warn_unsharded_mesh_axes(params: Sequence[tuple[str, P]], mesh: Any, rules: LogicalRules,
                             explained: Collection[str] = ()) -> None:
    """Warn once per model-parallel mesh axis of size > 1 and set of parameters that no parameter among `params`
    (path, spec) is split over: a module whose parameters carry no logical axes the rules map there runs replicated,
    every device holding every weight, though `fsdp_size` or `tensor_parallel_size` asked for them to be split.
    Axes in `explained` (dimensions they do not divide, `warn_indivisible`) are left to that warning."""
    used = {name for _, spec in params for entry in spec if entry is not None
            for name in ((entry,) if isinstance(entry, str) else entry)}
    paths = tuple(path for path, _ in params)
    for axis in MESH_AXES[1:]:
        finding = (axis, mesh.shape.get(axis, 1), paths)
        if not params or finding[1] == 1 or axis in used or finding in _WARNED_MESH_AXES or axis in explained:
            continue
        _WARNED_MESH_AXES.add(finding)
        logical = [name for name, target in rules if name != "batch"  # the rows of activations, not weights
                   and (target == axis or (isinstance(target, (tuple, list)) and axis in target))]
        shown = listed((path for path, _ in params), 3)
        logger.warning("%s=%d, but no parameter (%s) is split over the mesh axis %r: each is replicated on every "
                       "device. Give the module's parameters logical axes that the partition rules map to %r (%s), "
                       "e.g. nnx.Linear(..., kernel_init=nnx.with_partitioning(init, ('embed', 'mlp'))) on dimensions "
                       "that %d divides, or set %s=1.", MESH_FIELDS[axis], mesh.shape[axis], shown, axis, axis,
                       ", ".join(map(repr, logical)) or "no rule does: add one to partition_rules",
                       mesh.shape[axis], MESH_FIELDS[axis])


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, abstract_params: Any,
                        params_sharding: Any, mesh: Mesh) -> Any:
    """Optimizer moments take their parameter's sharding; anything else (counts, factored rows) is replicated.

    A moment is recognised by its path: optax keeps each parameter's dict keys under the state that
    tracks it (`mu['layers'][0]['mlp']['kernel']`), also inside `multi_transform` and `masked`, so the
    longest suffix of a leaf's path that names a parameter of the same shape picks the sharding. No
    `tx.init` is traced, so optimizers whose init reads the parameters (label functions) work too.
    """
    del tx
    replicated = NamedSharding(mesh, P())
    params = {_keys(path): (leaf, sharding) for (path, leaf), sharding in
              zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(params_sharding))}

    def follow(path: tuple, leaf: Any) -> NamedSharding:
        keys = _keys(path)
        for start in range(len(keys)):
            match = params.get(keys[start:])
            if match is not None and getattr(match[0], "shape", None) == getattr(leaf, "shape", None):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(follow, abstract_opt_state)


def _keys(path: tuple) -> tuple:
    """The dict keys and sequence indices of a pytree path (attribute names of optax states dropped)."""
    return tuple(entry.key if hasattr(entry, "key") else entry.idx for entry in path
                 if hasattr(entry, "key") or hasattr(entry, "idx"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the data-parallel axes, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def to_global_arrays(host_data: Any, sharding_: NamedSharding) -> Any:
    """A pytree of this process's host arrays as global `jax.Array`s laid out by `sharding_` (each process
    holds its own rows; no copy of other processes' data).

    Over several processes the local rows are assembled with `jax.make_array_from_process_local_data`, once
    for the whole tree. On one device the arrays go through `_uploader`, a jitted identity: jit's C++ dispatch
    places a small batch in about 20 us, where `jax.device_put` takes about 30 us and
    `make_array_from_process_local_data` 45 us of Python per array, host time a small model's step pays in
    full (`benchmarks/host_overhead.py`). The upload is intended, so a `jax.transfer_guard("disallow")` around
    the loop does not stop it, as it does not stop `device_put`. Over several devices of one process (where
    the identity program is slower to launch than `device_put`): one `jax.device_put` of the whole tree. Every
    way the device arrays are copies: the host batch may be changed or reused as soon as this returns
    (`tests/test_upload.py`).
    """
    if jax.process_count() > 1 or sharding_.num_devices > 1:
        if sharding_.mesh.devices.flat[0].platform == "cpu":
            # `device_put` (which `make_array_from_process_local_data` places its slices with) shares aligned numpy
            # buffers with CPU devices, `may_alias=False` notwithstanding: copy first, so that a host batch changed
            # or reused after this returns never reaches the device arrays.
            host_data = jax.tree.map(lambda leaf: np.array(leaf) if isinstance(leaf, np.ndarray) else leaf, host_data)
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sharding_, host_data)
        return jax.device_put(host_data, sharding_)
    with jax.transfer_guard_host_to_device("allow"):
        return _uploader(sharding_)(host_data)


@functools.lru_cache(maxsize=8)
def _uploader(sharding_: NamedSharding) -> Callable[[Any], Any]:
    """The identity, jitted with `sharding_` in and out: arguments are placed by the dispatch, not copied again."""
    return jax.jit(lambda tree: tree, in_shardings=sharding_, out_shardings=sharding_)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[name] for name in BATCH_AXES)


_ACTIVATION_RULES: contextvars.ContextVar[LogicalRules] = contextvars.ContextVar("activation_rules",
                                                                               default=DEFAULT_RULES)


def devices_in_play() -> int:
    """How many devices a program traced now runs over: the mesh in context's (as the trainer traces its steps),
    else every device (a `jax.jit` of arrays laid out over them)."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.device_count() if mesh.empty else mesh.size


def on_one_cpu_device() -> bool:
    """Whether a program traced now runs on the CPU over one device (`devices_in_play`): XLA:CPU-only forms that
    would move data or fail to compile across devices apply there."""
    return jax.default_backend() == "cpu" and devices_in_play() == 1


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout from logical axis names, resolved like the parameters' by the rules.

    A no-op when no mesh of several devices is in context (one device, a model called outside the
    trainer, generation), so models can call it unconditionally. Rule targets that the context mesh
    lacks are ignored.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, _spec(logical_axes, x.shape, mesh))


def weight_in_use(w: jax.Array, logical_axes: Sequence[str | None], dtype: Any) -> jax.Array:
    """A parameter as the computation uses it: cast to `dtype` where each shard lives, then pinned whole
    over the data-parallel axes (`data`, `fsdp`) and split over the tensor-parallel one as its rules say.

    Under FSDP the all-gather then moves the compute dtype (bfloat16: half the bytes of float32
    parameters), and the weight's gradient is reduced back to the parameter layout in it too. The cast
    runs in a `shard_map`: a constraint on the cast weight alone lets the partitioner move the cast after
    the gather (it does, for every weight). Outside a mesh context just the cast, like `constrain`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return w.astype(dtype)
    if w.dtype != jax.numpy.dtype(dtype):
        stored = _spec(logical_axes, w.shape, mesh)
        w = jax.shard_map(lambda shard: shard.astype(dtype), mesh=mesh, in_specs=stored, out_specs=stored)(w)
    return jax.lax.with_sharding_constraint(w, _spec(logical_axes, w.shape, mesh, drop=BATCH_AXES))


def per_device(fn: Callable[..., jax.Array], args: Sequence[jax.Array],
               logical_axes: Sequence[Sequence[str | None]]) -> jax.Array:
    """`fn` on each device's shards of `args`, for a kernel the partitioner cannot split (a Pallas call).

    Each argument is split as its logical axes say (leading dimensions; the rest whole), and the result is
    laid out like the first argument. Outside a mesh of several devices, just `fn(*args)`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    specs = tuple(_spec(tuple(axes) + (None,) * (x.ndim - len(axes)), x.shape, mesh)
                  for x, axes in zip(args, logical_axes, strict=True))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def _spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: AbstractMesh,
          drop: Sequence[str] = ()) -> P:
    """The context rules' spec on `mesh`, leaving out rule targets the mesh lacks and the `drop` axes."""
    kept = [name for name in mesh.axis_names if name not in drop]
    rules = [(name, _present_axes(target, kept)) for name, target in _ACTIVATION_RULES.get()]
    return logical_to_spec(logical_axes, shape, mesh, rules)


def _present_axes(target: Any, axis_names: Sequence[str]) -> tuple[str, ...]:
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(name for name in names if name in axis_names)


def with_activation_layout(fn: Callable[..., Any], mesh: Mesh | AbstractMesh,
                           rules: LogicalRules = DEFAULT_RULES) -> Callable[..., Any]:
    """`fn` traced with `mesh` and `rules` in context, so the model's `constrain` calls take effect.

    Wrap a step before `jax.jit`: the mesh has to be in context while the step is traced, and
    `jax.set_mesh` cannot be entered inside a trace. Keeps `fn`'s name for compile logs.
    """

    def traced(*args: Any, **kwargs: Any) -> Any:
        token = _ACTIVATION_RULES.set(tuple(rules))
        try:
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args, **kwargs)
        finally:
            _ACTIVATION_RULES.reset(token)

    inner = getattr(fn, "func", fn)  # a functools.partial of the step
    traced.__name__ = traced.__qualname__ = getattr(fn, "__name__", getattr(inner, "__name__", "step"))
    return traced
