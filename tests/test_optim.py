import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easytrain import TrainingArguments, compiler_options
from easytrain.optim import (build_optimizer, build_schedule, clip_by_global_norm, decay_mask, global_norm,
                             warmup_steps)
from runs import facts_on_eight_devices


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_peaks_exactly_at_warmup_steps_and_decays(kind):
    args = TrainingArguments(learning_rate=1e-2, warmup_steps=10, lr_scheduler_type=kind)
    schedule = build_schedule(args, total_steps=50)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-2)
    assert float(schedule(5)) == pytest.approx(5e-3)
    if kind == "constant":
        assert float(schedule(50)) == pytest.approx(1e-2)
    else:
        assert float(schedule(50)) == pytest.approx(0.0, abs=1e-9)
        assert float(schedule(30)) < 1e-2


def test_warmup_ratio():
    schedule = build_schedule(TrainingArguments(learning_rate=1.0, warmup_ratio=0.2), total_steps=100)
    assert float(schedule(20)) == pytest.approx(1.0)
    assert float(schedule(10)) == pytest.approx(0.5)


@pytest.mark.parametrize(("ratio", "total", "expected"), [
    (0.29, 100, 29), (0.57, 100, 57), (0.58, 100, 58), (0.05, 100, 5), (0.295, 100, 29),
    (1 / 3, 3, 1), (1 / 3, 300, 100), (2 / 3, 3, 2), (1 / 7, 700, 100), (0.1, 7, 0)])
def test_warmup_ratio_rounds_the_product_down_not_its_float_error(ratio, total, expected):
    """0.29 * 100 is 28.999999999999996 in floats: a plain int() gave 28 updates of warmup where the help's
    'rounded down' means 29; and 1/3 of 3 is 1, however the ratio was written (its 16-digit decimal times 3 is
    0.9999999999999999)."""
    assert warmup_steps(TrainingArguments(warmup_ratio=ratio), total_steps=total) == expected


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_longer_than_the_run_is_cut_to_its_length(kind):
    """As warmup_steps' help says: with warmup_steps >= the run's updates the peak is never applied, the last
    update uses (total - 1) / total of it (an uncut warmup of 10 would climb by 1/10 per update instead)."""
    schedule = build_schedule(TrainingArguments(learning_rate=1.0, warmup_steps=10, lr_scheduler_type=kind), 5)
    assert [float(schedule(k)) for k in range(5)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_minimises_a_quadratic(name):
    args = TrainingArguments(optimizer=name, learning_rate=0.05, weight_decay=0.01, lr_scheduler_type="constant")
    tx = build_optimizer(args, build_schedule(args, 100))
    params = {"w": jnp.full((4, 4), 3.0), "b": jnp.full((4,), -2.0)}
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    start = float(loss(params))
    for _ in range(60):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.5 * start


@pytest.mark.parametrize("name", ["adafactor", "lion"])
def test_weight_decay_is_scaled_by_the_learning_rate_as_adamws_is(name):
    """`weight_decay` means the same for every optimizer: with zero gradients an update is -lr * wd * w on the
    matrices (adafactor applied wd per update, 1 / lr times stronger: a run's weights collapsed in 40 steps)."""
    params = {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "scale": jnp.ones(4)}
    zeros = jax.tree.map(jnp.zeros_like, params)

    def update(optimizer):
        args = TrainingArguments(optimizer=optimizer, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.0,
                                 lr_scheduler_type="constant", warmup_steps=0)
        tx = build_optimizer(args, build_schedule(args, 10))
        return tx.update(zeros, tx.init(params), params)[0]

    got, adamw = update(name), update("adamw")
    np.testing.assert_allclose(got["kernel"], -1e-2 * 0.1 * params["kernel"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got["kernel"], adamw["kernel"], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(got["scale"], 0.0)


def test_decay_skips_vectors():
    mask = decay_mask({"kernel": np.zeros((2, 3)), "scale": np.zeros(3)})
    assert mask == {"kernel": True, "scale": False}


def test_clipping_bounds_the_update():
    args = TrainingArguments(optimizer="sgd", sgd_momentum=0.0, learning_rate=1.0, max_grad_norm=1.0,
                             lr_scheduler_type="constant")
    tx = build_optimizer(args, build_schedule(args, 10))
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_clipping_acts_on_the_gradients_before_the_update_rule(name):
    """max_grad_norm clips the gradients, first in the chain, not the optimizer's update: at learning rate 0.5 a
    clipped SGD update has norm 0.5 (clipping the update would give 1.0), and AdamW's updates are optax's chain."""
    args = TrainingArguments(optimizer=name, learning_rate=0.5, max_grad_norm=1.0, weight_decay=0.0,
                             sgd_momentum=0.0, lr_scheduler_type="constant", warmup_steps=0)
    inner = optax.adamw(0.5, weight_decay=0.0, mask=decay_mask) if name == "adamw" else optax.sgd(0.5)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
    grads = {"w": jnp.full((3, 4), 10.0), "b": jnp.arange(4.0)}  # norm about 35: clipped

    def updates_of(tx: optax.GradientTransformation) -> list[dict]:
        state, out = tx.init(params), []
        for k in range(3):
            updates, state = tx.update(jax.tree.map(lambda g, k=k: g * (k + 1), grads), state, params)
            out.append(updates)
        return out

    got = updates_of(build_optimizer(args, build_schedule(args, 10)))
    want = updates_of(optax.chain(optax.clip_by_global_norm(1.0), inner))
    for mine, theirs in zip(got, want):
        for key in params:
            np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-6, atol=1e-7, err_msg=key)
        if name == "sgd":
            assert float(optax.tree.norm(mine)) == pytest.approx(0.5, rel=1e-5)


def test_global_norm_is_the_float64_norm_of_every_leaf():
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(5, 7)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32),
            "s": np.float32(2.5), "h": rng.normal(size=(4, 2, 3)).astype(jnp.bfloat16),
            # larger leaves of both dtypes and ranks, one with large values
            "g": rng.normal(size=(300, 256)).astype(np.float32) * 30, "n": rng.normal(size=128).astype(np.float32),
            "m": rng.normal(size=(2, 3, 64)).astype(jnp.bfloat16)}
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    got = global_norm(jax.tree.map(jnp.asarray, tree))
    assert got.dtype == jnp.float32 and float(got) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("shape, plain", [((4096, 256), True), ((1024, 256), True), ((256,), True),
                                          ((1733, 64), False), ((37, 29, 3), False)])
def test_global_norm_compiles_to_plain_reductions_on_cpu_and_keeps_float64_accuracy(shape, plain):
    """XLA:CPU turns every large sum into a tree of `reduce-window` kernels (one more kernel to compile per
    level): the norm of a million-element gradient compiles with none and sums
    its squares in blocks small enough to stay exact to 1e-6 (one plain reduction over all of it is 1e-5 off).
    Axes with a prime factor above 32 (1733, 37) still sum correctly, the usual way. XLA's own emitters are
    pinned (the options `auto` gives on AMD); with XLA's defaults (`auto` on Intel) YNNPACK takes the sums
    over, as exact."""
    leaf = np.random.default_rng(0).normal(1.0, 1.0, size=shape).astype(np.float32)  # positive mean: no cancelling
    want = np.sqrt(np.sum(np.asarray(leaf, np.float64) ** 2))
    for options in ({"xla_cpu_experimental_ynn_fusion_type": ""}, {}):
        compiled = jax.jit(global_norm, compiler_options=options).lower({"w": jnp.asarray(leaf)}).compile()
        assert float(compiled({"w": jnp.asarray(leaf)})) == pytest.approx(want, rel=1e-6), options
        if options:
            assert ("reduce-window" not in compiled.as_text()) == plain


def test_global_norm_on_one_device_sums_leaves_of_one_size_together():
    """A Llama's gradients are a few sizes many times over (every layer's q, k, v and o kernels): on one device the
    squares of same-sized leaves are added elementwise inside one staged sum, two reductions per size instead of
    two per leaf (fewer kernels for XLA:CPU to compile), still the float64 norm."""
    rng = np.random.default_rng(3)
    shapes = [(256, 256)] * 8 + [(256, 1024), (1024, 256)] * 3 + [(256,)] * 5 + [(1733, 3)]
    tree = [jnp.asarray(rng.normal(size=shape) * rng.uniform(0.1, 10), jnp.float32) for shape in shapes]
    tree[0] = tree[0].astype(jnp.bfloat16)
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree))
    options = compiler_options.for_platform(compiler_options.AUTO, "cpu")
    compiled = jax.jit(global_norm, compiler_options=options).lower(tree).compile()
    assert float(compiled(tree)) == pytest.approx(want, rel=1e-6)
    reductions = compiled.as_text().count(" reduce(")
    assert reductions <= 2 * len({np.prod(shape) for shape in shapes}), reductions


def test_global_norm_on_one_device_views_each_leaf_once():
    """Every train step's first compile traces the norm: each leaf is reshaped once, straight to its staged view
    (not flattened first), and its stages are plain reductions with no nested program."""
    shapes = [(256, 256)] * 4 + [(256, 1024), (1024, 256)] + [(256,)] * 3
    jaxpr = jax.make_jaxpr(global_norm)([jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes])
    names = [eqn.primitive.name for eqn in jaxpr.eqns]
    assert names.count("reshape") == len(shapes) and "pjit" not in names and "jit" not in names, names


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_clipping_equals_optaxs_with_the_same_state(scale):
    """Below and above the threshold, with and without the norm handed in; optax's state, so checkpoints
    written with either restore into the other."""
    rng = np.random.default_rng(1)
    grads = {"w": jnp.asarray(rng.normal(size=(6, 4)) * scale, jnp.float32), "b": jnp.asarray(rng.normal(size=4))}
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    want, their_state = theirs.update(grads, theirs.init(grads))
    for extra in ({}, {"grad_norm": global_norm(grads), "grad_norm_of": grads}):
        got, state = ours.update(grads, ours.init(grads), **extra)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        assert jax.tree.structure(state) == jax.tree.structure(their_state)
    chained = lambda clip: optax.chain(clip, optax.adamw(1e-3)).init(grads)
    assert jax.tree.structure(chained(ours)) == jax.tree.structure(chained(theirs))


def test_clipping_uses_the_norm_given_for_these_updates_only():
    """A norm handed in is used for the gradients it belongs to; other updates get their own norm."""
    grads = {"w": jnp.full((4,), 3.0)}
    clip = clip_by_global_norm(1.0)
    clipped, _ = clip.update(grads, optax.EmptyState(), grad_norm=jnp.float32(12.0), grad_norm_of=grads)
    np.testing.assert_allclose(clipped["w"], 3.0 / 12.0)
    copy = {"w": jnp.full((4,), 3.0)}
    for extra in ({"grad_norm_of": copy}, {}):
        clipped, _ = clip.update(grads, optax.EmptyState(), grad_norm=jnp.float32(12.0), **extra)
        np.testing.assert_allclose(clipped["w"], 3.0 / 6.0)  # its own norm, 6


def per_layer(tree: dict) -> dict:
    """`tree` with its `["layers"]["stacked"]` leaves split into one subtree per layer, the per-layer layout."""
    stack = tree["layers"]["stacked"]
    layers = jax.tree.leaves(stack)[0].shape[0]
    return {**tree, "layers": {i: jax.tree.map(lambda v: v[i], stack) for i in range(layers)}}


def stacked_and_per_layer_trees(layers: int = 3):
    """Parameters and gradients with a stacked `[L, ...]` matrix and norm scale (each layer at its own scale)
    and a leaf outside the stack, and the same values in the per-layer layout."""
    keys = jax.random.split(jax.random.key(0), 6)
    scales = jnp.asarray([0.1, 1.0, 3.0][:layers])
    tree = lambda k: {"layers": {"stacked": {  # noqa: E731
        "kernel": jax.random.normal(keys[k], (layers, 4, 8)) * scales[:, None, None],
        "scale": jax.random.normal(keys[k + 1], (layers, 8)) * scales[:, None] ** 2}},
        "head": jax.random.normal(keys[k + 2], (8, 4))}
    params, grads = tree(0), tree(3)
    return params, grads, per_layer(params), per_layer(grads)


def decoupled_adafactor(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """optax's adafactor at a constant rate, with AdamW's decoupled decay `-lr * wd * w` on the matrices."""
    return optax.chain(optax.adafactor(learning_rate),
                       optax.add_decayed_weights(-learning_rate * weight_decay, mask=decay_mask))


def test_adafactor_on_stacked_layers_updates_each_layer_as_optaxs_adafactor_does_alone():
    """Adafactor clips and scales each array's update by that array's RMS: over a stacked `[L, ...]` weight
    optax's own adafactor mixes the layers (its update differs by about half of itself); easytrain's gives
    each layer what optax gives the per-layer array, over several steps, with the same state types."""
    params, grads, params_per_layer, grads_per_layer = stacked_and_per_layer_trees()
    args = TrainingArguments(optimizer="adafactor", scan_layers=True, learning_rate=1e-2, weight_decay=0.1,
                             lr_scheduler_type="constant", max_grad_norm=0.0, warmup_steps=0)
    schedule = build_schedule(args, 10)
    ours, reference = build_optimizer(args, schedule), decoupled_adafactor(1e-2, 0.1)
    optaxs = optax.adafactor(schedule, weight_decay_rate=0.1, weight_decay_mask=decay_mask)
    mixed = reference.update(grads, reference.init(params), params)[0]
    expected = reference.update(grads_per_layer, reference.init(params_per_layer), params_per_layer)[0]
    gap = jnp.abs(per_layer(mixed)["layers"][0]["kernel"] - expected["layers"][0]["kernel"]).max()
    assert float(gap) > 0.1 * float(jnp.abs(expected["layers"][0]["kernel"]).max())

    state, reference_state = ours.init(params), reference.init(params_per_layer)
    assert [type(s).__name__ for s in state] == [type(s).__name__ for s in optaxs.init(params_per_layer)]
    for _ in range(3):
        updates, state = ours.update(grads, state, params)
        expected, reference_state = reference.update(grads_per_layer, reference_state, params_per_layer)
        for got, want in zip(jax.tree.leaves(per_layer(updates)), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        params, params_per_layer = optax.apply_updates(params, updates), optax.apply_updates(params_per_layer, expected)

    # Without stacked leaves it is optax's adafactor, state and all (older checkpoints restore), with the decay
    # scaled by the learning rate.
    state = ours.init(params_per_layer)
    assert jax.tree.structure(state) == jax.tree.structure(optaxs.init(params_per_layer))
    for got, want in zip(jax.tree.leaves(ours.update(grads_per_layer, state, params_per_layer)[0]),
                         jax.tree.leaves(reference.update(grads_per_layer, reference.init(params_per_layer),
                                                          params_per_layer)[0])):
        np.testing.assert_allclose(got, want, rtol=1e-6)  # the decay divided, then multiplied, by the RMS


def test_adafactor_never_factors_the_layer_axis_of_a_stack_of_128_layers_or_more():
    """With 128 or more stacked layers optax would factor a stacked norm scale `[L, 256]` over its layer axis,
    where each layer's `[256]` vector is never factored, and a stacked `[L, 130, 4]` kernel over `(L, 130)`
    instead of each layer's `(130, 4)` (not factored either): easytrain's update is still each layer's own,
    and its state stacks the per-layer states (placeholders included), so it splits by layer."""
    layers, keys = 128, jax.random.split(jax.random.key(2), 4)
    scales = jnp.linspace(0.1, 3.0, layers)
    tree = lambda k: {"layers": {"stacked": {  # noqa: E731
        "scale": jax.random.normal(keys[k], (layers, 256)) * scales[:, None],
        "kernel": jax.random.normal(keys[k + 1], (layers, 130, 4)) * scales[:, None, None]}}}
    params, grads = tree(0), tree(2)
    args = TrainingArguments(optimizer="adafactor", scan_layers=True, learning_rate=1e-2, weight_decay=0.01,
                             lr_scheduler_type="constant", max_grad_norm=0.0, warmup_steps=0)
    schedule = build_schedule(args, 10)
    ours, reference = build_optimizer(args, schedule), decoupled_adafactor(1e-2, 0.01)
    state, reference_state = ours.init(params), reference.init(per_layer(params))
    for _ in range(2):
        updates, state = ours.update(grads, state, params)
        expected, reference_state = reference.update(per_layer(grads), reference_state, per_layer(params))
        for got, want in zip(jax.tree.leaves(per_layer(updates)), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # Every statistic (and placeholder) of the stacked state is the per-layer one, stacked.
    factored, reference_factored = state[0], reference_state[0][0]
    for name in ("v_row", "v_col", "v"):
        for got, want in zip(jax.tree.leaves(per_layer(getattr(factored, name))),
                             jax.tree.leaves(getattr(reference_factored, name))):
            np.testing.assert_allclose(got, want, rtol=1e-6)


# ----------------------------------------------------------------------------- 8 devices, in a subprocess
NORM_LAYOUTS = {"fsdp x tensor": ("fsdp", "tensor"), "tensor x fsdp": ("tensor", "fsdp"), "rows": (("fsdp", "tensor"),),
                "columns": (None, "tensor")}


def sharded_norm_facts() -> dict:
    """The norm of a [4096, 256] gradient in each layout on a (1, 2, 4) mesh, with a vector and two leaves split
    8 ways along axes of 40 and 1000: value and collectives."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from easytrain.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    rng = np.random.default_rng(2)
    leaves = {"w": rng.normal(1.0, 1.0, size=(4096, 256)).astype(np.float32),
              "v": rng.normal(size=256).astype(np.float32),
              # 5 rows or 125 columns a device: split at shard boundaries only as 40 = 8 x 5, 1000 = 8 x 25 x 5
              "rows": rng.normal(size=(40, 24)).astype(np.float32),
              "columns": rng.normal(size=(24, 1000)).astype(np.float32)}
    want = float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves.values())))
    options = compiler_options.for_platform(compiler_options.AUTO, "cpu")
    facts = {}
    for name, spec in NORM_LAYOUTS.items():
        tree = {"w": jax.device_put(leaves["w"], NamedSharding(mesh, P(*spec))),
                "v": jax.device_put(leaves["v"], NamedSharding(mesh, P("tensor"))),
                "rows": jax.device_put(leaves["rows"], NamedSharding(mesh, P(("fsdp", "tensor")))),
                "columns": jax.device_put(leaves["columns"], NamedSharding(mesh, P(None, ("fsdp", "tensor"))))}
        compiled = jax.jit(global_norm, compiler_options=options).lower(tree).compile()
        text = compiled.as_text()
        facts[name] = {"error": abs(float(compiled(tree)) - want) / want,
                       "counts": {op: text.count(op + "(") for op in ("all-gather", "all-to-all", "collective-permute",
                                                                    "reduce-window")},
                       "inputs_kept": all(s.is_equivalent_to(x.sharding, x.ndim) for s, x in
                                          zip(jax.tree.leaves(compiled.input_shardings[0]), jax.tree.leaves(tree)))}
    # Rows over three devices, traced as the trainer traces its step (its mesh in context): the staged view would
    # cut across the shards (96 rows split as 32 x 3), so this norm sums each leaf as it is.
    six = jax.sharding.Mesh(np.array(jax.devices()[:6]).reshape(1, 3, 2), ("data", "fsdp", "tensor"))
    three_way = {"w": jax.device_put(leaves["w"][:96], NamedSharding(six, P("fsdp", "tensor")))}
    want = float(np.sqrt(np.sum(np.asarray(leaves["w"][:96], np.float64) ** 2)))

    def in_context(tree):
        with jax.sharding.use_abstract_mesh(six.abstract_mesh):
            return global_norm(tree)

    compiled = jax.jit(in_context, compiler_options=options).lower(three_way).compile()
    text = compiled.as_text()
    facts["three_way"] = {"error": abs(float(compiled(three_way)) - want) / want,
                          "counts": {op: text.count(op + "(") for op in ("all-gather", "all-to-all",
                                                                       "collective-permute")},
                          "inputs_kept": compiled.input_shardings[0][0]["w"].is_equivalent_to(three_way["w"].sharding,
                                                                                               2)}
    return facts


@pytest.fixture(scope="module")
def norm_facts() -> dict:
    return facts_on_eight_devices(__file__)


def test_the_sharded_global_norm_moves_no_gradient_and_stays_exact(norm_facts):
    """Split into factors of at most 32, every sharded axis keeps its sharding: per-shard partial sums and
    all-reduces only, no gather or reshuffle of a gradient, the float64 value."""
    for name, fact in norm_facts.items():
        if name == "three_way":
            continue
        assert fact["error"] < 1e-6, (name, fact)
        assert fact["inputs_kept"], name
        assert fact["counts"] == {"all-gather": 0, "all-to-all": 0, "collective-permute": 0, "reduce-window": 0}, name


def test_the_norm_over_a_mesh_axis_of_three_moves_no_gradient(norm_facts):
    """A split of 96 rows into 32 x 3 cuts across shards of 32 rows: on a mesh that is not a power of two of devices
    the norm sums each leaf as it is (XLA's reduce-windows) rather than gather it."""
    fact = norm_facts["three_way"]
    assert fact["error"] < 1e-6, fact
    assert fact["inputs_kept"], fact
    assert fact["counts"] == {"all-gather": 0, "all-to-all": 0, "collective-permute": 0}, fact


if __name__ == "__main__":
    print(json.dumps(sharded_norm_facts()))
