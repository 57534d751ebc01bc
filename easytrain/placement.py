"""Create the `TrainState` directly in its sharded layout.

Shapes come from `nnx.eval_shape`; shardings from the parameters' logical axes; then the whole state
(parameters and optimizer moments) is built inside `jax.jit(..., out_shardings=...)`, so no array is
ever materialised whole on one device.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from easytrain import sharding
from easytrain.errors import ArgumentError
from easytrain.listing import listed
from easytrain.state import TrainState, raw_key

Filter = nnx.filterlib.Filter
logger = logging.getLogger("easytrain")


def abstract_module(model_fn: Callable[[], nnx.Module]) -> nnx.Module:
    """The module with `ShapeDtypeStruct` leaves: no memory, no compute."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(model_fn)


def state_shardings(abstract_model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.LogicalRules = sharding.DEFAULT_RULES, trainable: Filter = nnx.Param,
                    base: Filter = nnx.Nothing) -> TrainState:
    """A `TrainState`-shaped tree of `NamedSharding`s for this model, optimizer and mesh."""
    graphdef, abs_params, abs_base, abs_rest = nnx.split(abstract_model, trainable, base, ...)
    params_sh = sharding.param_shardings(abs_params, mesh, rules)
    rest_sh = sharding.param_shardings(abs_rest, mesh, rules)
    base_sh = sharding.param_shardings(abs_base, mesh, rules)
    pure_params = nnx.to_pure_dict(abs_params)
    abs_opt = jax.eval_shape(tx.init, pure_params)
    opt_sh = sharding.optimizer_shardings(tx, abs_opt, pure_params, params_sh, mesh)
    replicated = sharding.replicated(mesh)
    return TrainState(step=replicated, params=params_sh, model_state=rest_sh, opt_state=opt_sh,
                      rng=replicated, graphdef=graphdef, tx=tx, trainable=trainable, base=base_sh, base_filter=base)


def _fresh_state(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, seed: int,
                 trainable: Filter, base_filter: Filter) -> Callable[..., TrainState]:
    """`(params, base, model_state) -> TrainState` at step 0 with fresh optimizer moments."""

    def create(params: Any, base: Any, rest: Any) -> TrainState:
        return TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=tx, rng=raw_key(seed),
                                 trainable=trainable, base=base, base_filter=base_filter)

    return create


def _pure_split(model: nnx.Module, trainable: Filter, base: Filter) -> tuple[nnx.GraphDef, Any, Any, Any]:
    graphdef, *parts = nnx.split(model, trainable, base, ...)
    return graphdef, *(nnx.to_pure_dict(part) for part in parts)


def create_state(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, *, seed: int,
                 mesh: Mesh, rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
                 trainable: Filter = nnx.Param, base: Filter = nnx.Nothing) -> tuple[TrainState, TrainState]:
    """Initialise a fresh model and its optimizer state in place on the mesh.

    Returns `(state, shardings)`; `shardings` is also the layout every checkpoint restores onto.
    """
    shardings = state_shardings(abstract_module(model_fn), tx, mesh, rules, trainable, base)

    def init() -> TrainState:
        with nnx.use_eager_sharding(False):
            graphdef, *parts = _pure_split(model_fn(), trainable, base)
        return _fresh_state(graphdef, tx, seed, trainable, base)(*parts)

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return state, shardings


def initialise_module(model_fn: Callable[[], nnx.Module], *, mesh: Mesh,
                      rules: sharding.LogicalRules = sharding.DEFAULT_RULES) -> nnx.Module:
    """A fresh module, its variables built by one jitted program straight into their sharded layout (each split
    by its logical axes): concrete, to be changed eagerly and then placed with `place_module(..., copy=False)`
    as a loaded model is. Nothing is ever materialised whole on one device."""
    graphdef, abstract = nnx.split(abstract_module(model_fn))
    shardings = sharding.param_shardings(abstract, mesh, rules)

    def init() -> Any:
        with nnx.use_eager_sharding(False):
            return nnx.to_pure_dict(nnx.state(model_fn()))

    with jax.set_mesh(mesh):
        values = jax.jit(init, out_shardings=shardings)()
    nnx.replace_by_pure_dict(abstract, values)
    return nnx.merge(graphdef, abstract)


def place_module(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int, mesh: Mesh,
                 rules: sharding.LogicalRules = sharding.DEFAULT_RULES, trainable: Filter = nnx.Param,
                 base: Filter = nnx.Nothing, copy: bool = True) -> tuple[TrainState, TrainState]:
    """Place an existing module's variables on the mesh and build its optimizer state.

    The train step donates the state's buffers, so by default they are copies and the caller's arrays
    stay valid. `copy=False` keeps variables already in the target layout as they are, for modules the
    trainer built itself (`from_pretrained(..., mesh=...)`), where a copy would only double the memory.
    """
    graphdef, params, base_values, rest = _pure_split(model, trainable, base)
    shardings = state_shardings(model, tx, mesh, rules, trainable, base)
    create = _fresh_state(graphdef, tx, seed, trainable, base)
    put = lambda tree, target: jax.device_put(tree, target, may_alias=False if copy else None)
    placed = dict(params=None, base=None, model_state=None)
    with jax.set_mesh(mesh):
        params, base_values = put(params, shardings.params), put(base_values, shardings.base)
        rest = put(rest, shardings.model_state)
        state = jax.jit(lambda p, b, r: create(p, b, r).replace(**placed),
                        out_shardings=shardings.replace(**placed))(params, base_values, rest)
    return state.replace(params=params, base=base_values, model_state=rest), shardings


def abstract_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int, mesh: Mesh,
                         rules: sharding.LogicalRules = sharding.DEFAULT_RULES, trainable: Filter = nnx.Param,
                         base: Filter = nnx.Nothing) -> tuple[TrainState, TrainState]:
    """The state `create_state`/`place_module` would build, as sharded `ShapeDtypeStruct`s.

    Nothing is allocated or computed: this is the target a checkpoint restores straight into, so a resumed
    run never initialises (or loads pretrained) weights only to overwrite them. `model` may be abstract.
    """
    graphdef, *parts = _pure_split(model, trainable, base)
    shardings = state_shardings(model, tx, mesh, rules, trainable, base)
    shapes = jax.eval_shape(_fresh_state(graphdef, tx, seed, trainable, base), *parts)
    return abstract_state(shardings, shapes), shardings


def abstract_state(shardings: TrainState, state: TrainState) -> TrainState:
    """`ShapeDtypeStruct`s carrying the target shardings: the restore target for checkpoints."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def float_param_dtypes(module: nnx.Module, selected: nnx.filterlib.Filter = nnx.Param) -> list[tuple[str, Any]]:
    """(path, dtype) of `module`'s floating-point parameters (those `selected`; integer and other storage, a quantised
    weight's, is not a float dtype the run's arguments set)."""
    found = []
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.All(nnx.Param, selected))):
        dtype = jax.numpy.dtype(variable.get_value().dtype if hasattr(variable, "get_value") else variable.value.dtype)
        if jax.numpy.issubdtype(dtype, jax.numpy.floating):
            found.append((".".join(map(str, path)), dtype))
    return found


def param_dtype_mismatches(module: nnx.Module, param_dtype: Any) -> list[str]:
    """`path (dtype)` of each floating-point parameter not stored in `param_dtype`: a module that does not read
    the argument."""
    wanted = jax.numpy.dtype(param_dtype)
    return [f"{path} ({dtype})" for path, dtype in float_param_dtypes(module) if dtype != wanted]


def refuse_float16_params(module: nnx.Module, shown: int = 3, *, given: bool = False,
                          trained: nnx.filterlib.Filter = nnx.Param) -> None:
    """Refuse float16 parameters the run trains (`trained`: under LoRA a frozen base is not) in the module passed as
    `model=` (`given`) or built by `create_module`, as `--param_dtype float16` is: the optimizer state is kept in the
    parameters' dtype, where AdamW's adam_epsilon (1e-8) and small squared gradients are zero, so most first updates
    are non-finite (NaN weights, even in a checkpoint saved under non_finite_policy='stop')."""
    half = [path for path, dtype in float_param_dtypes(module, trained) if dtype == jax.numpy.float16]
    if not half:
        return
    source = "the module passed as model=" if given else "the module create_module built"
    raise ArgumentError("param_dtype", f"{source} stores {len(half)} parameter(s) in float16 "
                        f"({listed(half, shown)}). The optimizer state is kept in the parameters' dtype, where "
                        "adam_epsilon and small squared gradients round to zero (the first updates are non-finite), "
                        "and float16 needs loss scaling, which easytrain does not do. Build it with "
                        "param_dtype=float32 (or bfloat16) and pass --param_dtype to match.")


def warn_unless_param_dtype(module: nnx.Module, param_dtype: Any, shown: int = 3, *, given: bool = False,
                            trained: nnx.filterlib.Filter = nnx.Param) -> None:
    """Refuse float16 parameters (`refuse_float16_params`), and warn when `create_module` built parameters (or,
    `given`, the module passed as `model=` holds them) in another float dtype than `param_dtype`: the run's `dtype`
    and `param_dtype` reach a custom module only through the arguments it is built with, and the trainer trains its
    parameters in the dtypes it finds."""
    refuse_float16_params(module, shown, given=given, trained=trained)
    if not (found := param_dtype_mismatches(module, param_dtype)):
        return
    which = f"{len(found)} parameter(s) in another dtype: {listed(found, shown)}"
    wanted = jax.numpy.dtype(param_dtype).name
    if given:
        logger.warning("param_dtype is %s, but the module passed as model= holds %s; it is trained in the dtypes it "
                       "was built with. Build it with param_dtype=%s (and dtype=the run's dtype, e.g. nnx.Linear(..., "
                       "dtype=..., param_dtype=...)), or set param_dtype to the dtype it uses.", wanted, which, wanted)
        return
    logger.warning("param_dtype is %s, but create_module built %s; the module does not read the run's "
                   "dtype/param_dtype. Build it with param_dtype=self.param_dtype and dtype=self.dtype (e.g. "
                   "nnx.Linear(..., dtype=self.dtype, param_dtype=self.param_dtype)) in create_module, or set "
                   "param_dtype to the dtype it uses.", wanted, which)


def compute_dtype_paths(module: nnx.Module) -> dict[str, Any]:
    """Path -> compute dtype of each submodule (the module itself included) whose `dtype` attribute is set to a
    float dtype (`nnx.Linear(..., dtype=...)`, the model's own layers): the dtype it computes in, which no argument
    changes once it is built. None (compute in the inputs' dtype) and anything not a float dtype are left out."""
    found = {}
    for path, submodule in nnx.iter_modules(module):
        if (value := getattr(submodule, "dtype", None)) is None:
            continue
        try:
            dtype = jax.numpy.dtype(value)
        except TypeError:  # a `dtype` attribute of another meaning
            continue
        if jax.numpy.issubdtype(dtype, jax.numpy.floating):
            found[".".join(map(str, path)) or type(submodule).__name__] = dtype
    return found


def compute_dtypes(module: nnx.Module) -> set[Any]:
    """The float dtypes `module`'s submodules compute in (`compute_dtype_paths`)."""
    return set(compute_dtype_paths(module).values())


def check_compute_dtype(module: nnx.Module | None, dtype: Any, shown: int = 3, *, given: bool = False) -> Any:
    """Refuse a module (`given`: passed as `model=`, else built by `create_module`) that computes in float16, as
    `--dtype float16` is refused; warn when it computes in another dtype than the run's `dtype`, which
    `trainer.dtype`, the saved arguments and the resume and DPO reference checks follow. Returns `module`."""
    if module is None or not (paths := compute_dtype_paths(module)):
        return module
    source = "the module passed as model=" if given else "the module create_module built"
    named = lambda chosen: listed((f"{p} ({d.name})" for p, d in chosen), shown)  # noqa: E731
    if half := [(p, d) for p, d in paths.items() if d == jax.numpy.float16]:
        raise ArgumentError("dtype", f"{source} computes in float16 ({named(half)}), which needs dynamic loss "
                                     "scaling that easytrain does not do: small gradients underflow to zero silently. "
                                     "Build it with dtype=bfloat16 (same exponent range as float32) or float32, and "
                                     "pass --dtype bfloat16 or --dtype float32 to match.")
    wanted = jax.numpy.dtype(dtype)
    if other := [(p, d) for p, d in paths.items() if d != wanted]:
        names = sorted({d.name for d in paths.values()})
        fix = f"pass --dtype {names[0]}" if len(names) == 1 else f"build it in one dtype ({' or '.join(names)})"
        logger.warning("dtype is %s, but %s computes in %s: %s. It computes in the dtypes it was built with, while "
                       "trainer.dtype, the saved arguments, a resume's dtype check and DPO's reference log-prob cache "
                       "follow --dtype: %s so they agree, or build it with dtype=%s.", wanted.name, source,
                       "/".join(sorted({d.name for _, d in other})), named(other), fix, wanted.name)
    return module


def check_given_module(module: nnx.Module | None, dtype: Any, param_dtype: Any,
                       trained: nnx.filterlib.Filter = nnx.Param) -> None:
    """The module passed as `model=` (None: none was): its compute dtype checked, then its parameters' storage
    (those `trained` refused in float16)."""
    if module is not None:
        warn_unless_param_dtype(check_compute_dtype(module, dtype, given=True), param_dtype, given=True,
                                trained=trained)
