"""Frozen state: named non-trainable pytrees a trainer carries next to the model.

A reference policy, a teacher, an EMA copy or a reward model is declared once with `Frozen` in
`BaseTrainer.configure_frozen`. It is placed on the mesh by the same logical-axis rules as the
parameters, lives in `TrainState.frozen` (so it reaches the compiled step as an argument, never as a
compile-time constant, and is donated and returned without a copy), is handed to the loss, gets no
gradient and no optimizer state, and is either checkpointed or rebuilt on resume, as declared. A rebuilt entry's
digests are taken once at every start (`FrozenPlan.fingerprints`) and recorded in run_info, so a resume that would
rebuild it with other values (a teacher folder overwritten since) is refused before any array is restored.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, ContextManager, Mapping, NamedTuple

import jax
from flax import nnx
from jax.sharding import Mesh

from easytrain import integrity, sharding
from easytrain.errors import EasytrainError
from easytrain.listing import listed
from easytrain.models.scan import STACKED, layer_slices, unstack_layer_dicts

PyTree = Any
#: A context under which module builders build their layers stacked (`LanguageModelHooks.initialising`).
StackedBuild = Callable[[], ContextManager[Any]]


class FrozenError(EasytrainError, ValueError):
    """A frozen entry that does not fit the run it is declared in."""


class Frozen(NamedTuple):
    """One frozen entry.

    Attributes:
        value: an `nnx.Module` or a pytree of arrays (copied onto the mesh), or a zero-argument function
            building one. A builder runs under `jax.jit` with sharded outputs, so a large module is never
            materialised whole on one device; it must create its own `nnx.Rngs` (like `create_module`).
        checkpoint: True writes the entry into every checkpoint and restores it on resume (state that
            changes, e.g. an EMA); False rebuilds it from `value` on resume (a fixed reference or teacher).
        copy: False keeps a given value's arrays when they are already in the target layout, for modules
            nobody else holds (e.g. just loaded with `from_pretrained(..., mesh=...)`): no second copy.
        mirrors_params: True for an entry combined leaf by leaf with `state.params` (an EMA, a reference moved
            toward the policy): set-up refuses one whose tree or shapes differ from them (not dtypes), naming where,
            instead of a pytree error in the traced step. `BaseTrainer.trainable_variables` builds one that fits.
        fingerprint: for a `checkpoint=False` entry: True digests its values at every start (on its devices, no
            weight gathered) into the checkpoints' run_info, and a resume that rebuilds it with other values (its
            source overwritten, a builder changed) is refused naming the tensors that differ, before any array is
            restored; False skips both, for an entry meant to differ between starts (re-drawn at random on purpose).
            The same values resume on any mesh and in either `scan_layers` layout. No effect with `checkpoint=True`:
            the checkpoint holds such an entry, checked by the checkpoint's own fingerprint.
        digests: the fingerprint (`integrity.fingerprint`, by dotted path) already taken of `value`'s very arrays, e.g.
            for a record of its own, so they are not digested again; used only where it names exactly its leaves.
    """

    value: nnx.Module | PyTree | Callable[[], nnx.Module | PyTree]
    checkpoint: bool = False
    copy: bool = True
    mirrors_params: bool = False
    fingerprint: bool = True
    digests: Mapping[str, list[int]] | None = None


class PlacedFrozen(NamedTuple):
    """Frozen entries on the mesh, with what `TrainState` records about them."""

    values: dict[str, PyTree]
    shardings: dict[str, PyTree]
    modules: tuple[tuple[str, nnx.GraphDef], ...]
    checkpointed: tuple[str, ...]


def _is_builder(value: Any) -> bool:
    return callable(value) and not isinstance(value, nnx.Module)


def _split(value: Any) -> tuple[nnx.GraphDef | None, Any]:
    """A module as (graphdef, nnx.State); a plain pytree as (None, itself)."""
    if isinstance(value, nnx.Module):
        graphdef, state = nnx.split(value)
        return graphdef, state
    return None, value


def _shardings(state: Any, mesh: Mesh, rules: sharding.LogicalRules) -> PyTree:
    """Module variables by their logical axes, as parameters are; plain arrays replicated."""
    if isinstance(state, nnx.State):
        return sharding.param_shardings(state, mesh, rules)
    return jax.tree.map(lambda _: sharding.replicated(mesh), state)


def _pure(state: Any) -> PyTree:
    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def place_frozen(specs: Mapping[str, Frozen], mesh: Mesh, rules: sharding.LogicalRules, *,
                 abstract: bool = False, stacked: StackedBuild | None = None) -> PlacedFrozen:
    """Build and place every entry, or with `abstract=True` only describe it (shapes and shardings: the
    restore target of checkpointed entries, at no memory cost). Builders run under `stacked` when that builds
    the same values with the layers stacked (`_build`)."""
    values, shardings, modules = {}, {}, []
    for name, spec in specs.items():
        if _is_builder(spec.value):
            with nnx.use_eager_sharding(False):
                graphdef, shapes = _split(nnx.eval_shape(spec.value))
        else:
            graphdef, shapes = _split(spec.value)
        target = _shardings(shapes, mesh, rules)
        if abstract:
            value = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), _pure(shapes), target)
        elif _is_builder(spec.value):
            value = _build(spec.value, _pure(shapes), target, mesh, rules, stacked)
        else:
            value = jax.device_put(_pure(shapes), target, may_alias=False if spec.copy else None)  # the step donates it
        values[name], shardings[name] = value, target
        if graphdef is not None:
            modules.append((name, graphdef))
    checkpointed = tuple(name for name, spec in specs.items() if spec.checkpoint)
    return PlacedFrozen(values, shardings, tuple(modules), checkpointed)


def _built(build: Callable[[], Any]) -> Any:
    with nnx.use_eager_sharding(False):
        return build()


def _jitted_values(build: Callable[[], Any], target: PyTree, mesh: Mesh) -> PyTree:
    with jax.set_mesh(mesh):
        return jax.jit(lambda: _pure(_split(_built(build))[1]), out_shardings=target)()


def _build(build: Callable[[], Any], shapes: PyTree, target: PyTree, mesh: Mesh, rules: sharding.LogicalRules,
           stacked: StackedBuild | None) -> PyTree:
    """A builder's values in `target`'s layout, by one jitted program.

    Built as it is, a module of unrolled layers draws every layer's weights separately: the program's compile time
    grows with depth (minutes for a 3B model on a GPU). Under `stacked` a module built by the trainer's
    `create_module` draws them as one vmapped layer, the same values. So the builder runs under `stacked` when
    that gives the same tree once its stacked layers are unstacked, done outside the program one weight at a time
    (`_unstacked`; slicing inside it would hold every layer twice); otherwise as it is.
    """
    if stacked is not None:
        with stacked(), nnx.use_eager_sharding(False):
            flagged = _split(nnx.eval_shape(build))[1]
        layer_shapes = lambda value, index: jax.ShapeDtypeStruct(value.shape[1:], value.dtype)  # noqa: E731
        if _same_shapes(unstack_layer_dicts(_pure(flagged), layer_shapes), shapes):
            with stacked():
                values = _jitted_values(build, _shardings(flagged, mesh, rules), mesh)
            return _unstacked(values, target)
    return _jitted_values(build, target, mesh)


def _same_shapes(tree: PyTree, shapes: PyTree) -> bool:
    """The same tree of leaves with the same shapes and dtypes."""
    if jax.tree.structure(tree) != jax.tree.structure(shapes):
        return False
    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(shapes))
    return all(a.shape == b.shape and a.dtype == b.dtype for a, b in pairs)


def _unstacked(values: PyTree, target: PyTree) -> PyTree:
    """`values` with their stacked layers unstacked into `target`'s layout, one stacked weight at a time: each is
    sliced into its layers and then deleted, so the devices hold at most one stacked weight more than the layers."""
    layers: dict[int, list[jax.Array]] = {}

    def take(value: jax.Array, index: int) -> jax.Array:
        if id(value) not in layers:
            layers[id(value)] = layer_slices(value)
            value.delete()
        return layers[id(value)][index]

    return jax.device_put(unstack_layer_dicts(values, take), target)


def attach(tree: Any, values: Mapping[str, PyTree], specs: Mapping[str, Frozen],
           modules: tuple[tuple[str, nnx.GraphDef], ...]) -> Any:
    """`tree` (a `TrainState`, or its tree of shardings or shapes) with frozen `values` added and the
    static facts every such tree must share (jit matches their structure exactly)."""
    return tree.replace(frozen={**tree.frozen, **values}, frozen_modules=modules,
                        frozen_checkpointed=tuple(name for name, spec in specs.items() if spec.checkpoint))


def _leaves(tree: PyTree) -> dict[str, Any]:
    return {"/".join(str(getattr(key, "key", key)) for key in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _difference(entry: PyTree, params: PyTree) -> str | None:
    """How `entry` differs from `params` (tree, then shapes), or None. Dtypes may differ: an average kept in another
    precision than the parameters (a float32 EMA of bfloat16 weights) is common practice."""
    ours, theirs = _leaves(entry), _leaves(params)
    for verb, names in (("has", ours.keys() - theirs.keys()), ("lacks", theirs.keys() - ours.keys())):
        if names:
            return (f"it {verb} {len(names)} leaf(s) that state.params {'lacks' if verb == 'has' else 'has'}: "
                    f"{listed(sorted(names), 3)}")
    for name, leaf in ours.items():
        if tuple(leaf.shape) != tuple(theirs[name].shape):
            return f"its {name} has shape {list(leaf.shape)} where state.params holds {list(theirs[name].shape)}"
    return None


def check_mirrors(specs: Mapping[str, Frozen], values: Mapping[str, PyTree], params: PyTree) -> None:
    """Entries declared `mirrors_params` must have `params`' tree and shapes (checked before any step)."""
    for name, spec in specs.items():
        if spec.mirrors_params and name in values and (problem := _difference(values[name], params)):
            raise FrozenError(f"frozen entry '{name}' is declared mirrors_params=True but {problem}. Build it with "
                              "Frozen(self.trainable_variables, ...): the variables this run trains (trainable_filter: "
                              "the LoRA adapters under lora_rank), in the run's layout.")


def declared_entries(specs: Any) -> dict[str, Frozen]:
    """`configure_frozen`'s result as a dict of `Frozen` entries, or a TypeError naming what is not one and the fix,
    before any entry is placed (not an AttributeError or a JAX type error from deep inside the placement)."""
    if not isinstance(specs, Mapping):
        raise TypeError(f"configure_frozen returned a {type(specs).__name__}; return a dict {{name: Frozen(...)}} "
                        "(empty for none): each entry reaches compute_loss as frozen[name].")
    for name, spec in specs.items():
        if not isinstance(spec, Frozen):
            raise TypeError(f"configure_frozen's entry {name!r} is a {type(spec).__name__}, not a Frozen: declare it "
                            f"as {{{name!r}: Frozen(value, checkpoint=False)}} (easytrain.frozen.Frozen; "
                            "checkpoint=True for an entry that changes, such as an EMA).")
        if isinstance(spec.value, (str, bytes, os.PathLike)):
            raise TypeError(f"configure_frozen's entry {name!r} holds the {type(spec.value).__name__} "
                            f"{os.fsdecode(spec.value)!r}, which is not loaded: pass the loaded module, "
                            "Frozen(from_pretrained(path, mesh=self.mesh, rules=self.partition_rules), "
                            "checkpoint=False) (easytrain.models.from_pretrained).")
    return dict(specs)


class FrozenPlan:
    """Where each declared entry comes from in this run: built now, or (checkpointed entries of a resumed
    run) restored from the checkpoint into an abstract target."""

    def __init__(self, specs: Mapping[str, Frozen], mesh: Mesh, rules: sharding.LogicalRules, *, resuming: bool,
                 stacked: StackedBuild | None = None):
        self.specs = specs = declared_entries(specs)
        self.built = place_frozen({k: f for k, f in specs.items() if not (resuming and f.checkpoint)}, mesh, rules,
                                  stacked=stacked)
        self.restored = place_frozen({k: f for k, f in specs.items() if resuming and f.checkpoint}, mesh, rules,
                                     abstract=True)
        self.modules = self.restored.modules + self.built.modules
        # Now, before the first step donates the built arrays: a resume compares these with the checkpoint's.
        self.fingerprints = fixed_fingerprints(self.specs, self.built.values)
        self._as_recorded: dict[str, dict[str, list[int]]] | None = None

    def fingerprints_as(self, recorded: Callable[[], Mapping[str, Any]]) -> dict[str, dict[str, list[int]]]:
        """`fingerprints`, each entry's named as the resumed checkpoint's record (`recorded()`, read once, before the
        first step: a stacked weight may be digested again a layer at a time) names it: `digests_as_recorded`."""
        if self._as_recorded is None:
            before = recorded() if self.fingerprints else {}
            self._as_recorded = {name: digests_as_recorded(self.built.values[name], digests, before[name])
                                 if before.get(name) else digests for name, digests in self.fingerprints.items()}
        return self._as_recorded

    def restore_target(self, abstract_state: Any) -> Any:
        """The abstract state a checkpoint of this run holds (with its checkpointed frozen entries)."""
        check_mirrors(self.specs, self.restored.values, abstract_state.params)
        return attach(abstract_state, self.restored.values, self.specs, self.modules)

    def attach_to(self, state: Any, shardings: Any) -> tuple[Any, Any]:
        """The state with every entry in place, and its shardings."""
        check_mirrors(self.specs, {**state.frozen, **self.built.values}, state.params)
        return (attach(state, self.built.values, self.specs, self.modules),
                attach(shardings, {**self.restored.shardings, **self.built.shardings}, self.specs, self.modules))


def fixed_fingerprints(specs: Mapping[str, Frozen], values: Mapping[str, PyTree]) -> dict[str, dict[str, list[int]]]:
    """Entry -> dotted path -> two digests (`integrity.fingerprint`) of each entry rebuilt on resume and declared
    `fingerprint=True`, computed where its arrays lie (each device digests its shard; a leaf of at most
    `integrity.SMALL_ON_HOST` elements on the host, cheaper than compiling its digest)."""
    return {name: entry_digests(spec, values[name]) for name, spec in specs.items()
            if not spec.checkpoint and spec.fingerprint and name in values}


def entry_digests(spec: Frozen, values: PyTree) -> dict[str, list[int]]:
    """The digests of an entry's placed `values`: those `spec` was given of them (`given_digests`), else taken now."""
    given = given_digests(spec, values)
    return integrity.fingerprint(values, integrity.SMALL_ON_HOST) if given is None else given


def given_digests(spec: Frozen, values: PyTree) -> dict[str, list[int]] | None:
    """`spec.digests` where they name exactly the leaves of `values` (its value placed: the same arrays, or copies,
    whose digests are the same on any sharding); None otherwise."""
    if spec.digests is None:
        return None
    paths = {jax.tree_util.keystr(path, simple=True, separator=".")
             for path, _ in jax.tree_util.tree_flatten_with_path(values)[0]}
    return dict(spec.digests) if paths == spec.digests.keys() else None


def _layer_path(stacked_path: str, index: int) -> str:
    """The dotted path layer `index` of a stacked weight has in the per-layer layout."""
    return stacked_path.replace(f".{STACKED}.", f".{index}.", 1)


def digests_as_recorded(values: PyTree, digests: Mapping[str, list[int]],
                        recorded: Mapping[str, Any]) -> dict[str, list[int]]:
    """`digests` (of `values`, by dotted path) in the layout `recorded` names, where a resume switched `scan_layers`:
    a stacked weight the record names layer by layer is digested a layer at a time (one layer's copy at a time), and
    layers the record names as one stack are combined into its digest (`integrity.combined_digest`: nothing is read
    again). Either way the digest is of the same values, so an entry compares equal in both layouts."""
    marker, found = f".{STACKED}.", dict(digests)
    leaves = {jax.tree_util.keystr(path, simple=True, separator="."): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(values)[0]}
    for path, leaf in leaves.items():
        if marker in path and path not in recorded and _layer_path(path, 0) in recorded:
            del found[path]
            for index in range(leaf.shape[0]):
                found[_layer_path(path, index)] = integrity.fingerprint({"layer": leaf[index]},
                                                                        integrity.SMALL_ON_HOST)["layer"]
    for path in recorded:
        if marker in path and path not in found and _layer_path(path, 0) in found:
            layers = list(itertools.takewhile(found.__contains__, (_layer_path(path, i) for i in itertools.count())))
            found[path] = integrity.combined_digest([found.pop(name) for name in layers], leaves[layers[0]].size)
    return found
