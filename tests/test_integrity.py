"""Checkpoint fingerprints: the values of the first (ravel-based) formula, computed shard by shard; `verify` refuses
an element changed or moved (the position-weighted digest, not only the plain sum).

Checkpoints written before the digests stopped flattening must still verify, so every value is
compared with that formula evaluated in NumPy. The multi-device facts come from this file run as a
script with 8 emulated CPU devices (the test process itself has one).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from easytrain import integrity
from runs import facts_on_eight_devices

GOLDEN = 2654435761
BIG = (1024, 4096)  # float32: a 2 MB shard per device on the (fsdp 2, tensor 4) mesh
STACKED = (8, 1024, 2048)  # float32, a stacked layer weight: an 8 MB shard per device, summed in place
THREE_WAY_ROWS = 768  # BIG's first rows, sharded over three devices
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce")


def reference(array) -> list[int]:
    """`[sum(bits), sum(bits * (i * GOLDEN + 1))]` mod 2**32 over the raveled bits, in uint64 NumPy."""
    if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        array = jax.random.key_data(array)
    values = np.asarray(array)
    if values.dtype.itemsize == 8:
        values = values.astype(np.float32 if np.issubdtype(values.dtype, np.floating) else np.int32)
    bits = values.view(f"uint{8 * values.dtype.itemsize}").ravel().astype(np.uint64)
    weights = (np.arange(bits.size, dtype=np.uint64) * GOLDEN + 1) % 2**32
    return [int(bits.sum() % 2**32), int((bits * weights % 2**32).sum() % 2**32)]


def samples() -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "float32": jnp.asarray(rng.standard_normal((64, 48), dtype=np.float32)),
        "bfloat16": jnp.asarray(rng.standard_normal((33, 17)).astype(jnp.bfloat16)),
        "int32": jnp.asarray(rng.integers(-2**31, 2**31, (7, 11), dtype=np.int32)),
        "int8": jnp.asarray(rng.integers(-128, 128, (4, 4, 4), dtype=np.int8)),
        "uint8": jnp.asarray(rng.integers(0, 256, (300,), dtype=np.uint8)),
        "bool": jnp.asarray(rng.random((5, 9)) < 0.5),
        "key": jax.random.split(jax.random.key(0), 6),
        "scalar": jnp.asarray(np.float32(-3.25)),
        "odd": jnp.asarray(rng.standard_normal((3, 5, 7), dtype=np.float32)),
    }


def test_digests_equal_the_ravel_formula():
    state = samples()
    assert integrity.fingerprint(state) == {name: reference(leaf) for name, leaf in state.items()}


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_the_digests_of_the_layers_combine_into_the_digest_of_their_stack(dtype):
    """What a record kept in the other `scan_layers` layout is compared with: a stacked weight's digest from its
    layers' digests alone, with no layer's values read again."""
    stack = jnp.asarray(np.random.default_rng(1).standard_normal((5, 6, 7)).astype(dtype))
    layers = [reference(stack[i]) for i in range(stack.shape[0])]
    assert integrity.combined_digest(layers, part_elements=6 * 7) == reference(stack)
    assert integrity.combined_digest(layers[::-1], part_elements=6 * 7) != reference(stack)  # the order counts


def test_eight_byte_types_digest_their_32_bit_view():
    with jax.enable_x64(True):
        state = {"f64": jnp.asarray(np.linspace(-2, 2, 30).reshape(5, 6)),
                 "i64": jnp.asarray(np.arange(-10, 14, dtype=np.int64).reshape(2, 3, 4))}
        assert state["f64"].dtype == jnp.float64 and state["i64"].dtype == jnp.int64
        assert integrity.fingerprint(state) == {name: reference(leaf) for name, leaf in state.items()}


def compiled_digest(leaf: jax.Array, block_elements: int = integrity._BLOCK_ELEMENTS):
    return integrity._leaf_digest.lower(leaf, *integrity._digest_plan(leaf, block_elements)).compile()


@pytest.mark.parametrize("block_elements", [1, 7, 64, 1000])
def test_digests_summed_in_blocks_equal_the_ravel_formula(block_elements):
    """Blocks along the leading axes (one row at a time, several rows, rows blocked again) sum to the same
    values as the whole array; tiny blocks make every path run on small arrays."""
    rng = np.random.default_rng(6)
    state = {**samples(), "stacked": jnp.asarray(rng.standard_normal((6, 10, 12), dtype=np.float32)),
             "primes": jnp.asarray(rng.standard_normal((7, 13, 5), dtype=np.float32)),
             "long": jnp.asarray(rng.integers(-2**31, 2**31, (4096,), dtype=np.int32))}
    for name, leaf in state.items():  # the blocked plan itself, whether or not the platform's plan blocks
        for in_place in (False, True):
            whole_axes = integrity._whole_leading_axes(leaf, block_elements)
            digest = integrity._leaf_digest(leaf, whole_axes, block_elements, in_place)
            assert [int(v) for v in np.asarray(digest)] == reference(leaf), (name, in_place)


@pytest.mark.parametrize("shape, loops", [((16, 1024, 1024), 0), ((8, 512, 1733), 1)])
def test_a_large_stacked_weight_is_digested_with_the_scratch_of_a_block_at_most(shape, loops):
    """Axes that split into factors of at most 32 are summed in place, in one pass; a large odd factor (1733)
    is summed the usual way, which writes out whatever it sums at once, so that weight goes a layer at a time:
    the scratch is a few copies of a block (the slice, its bits and weighted bits), not two of the array."""
    stacked = jax.random.normal(jax.random.key(7), shape)
    executable = compiled_digest(stacked)
    assert executable.as_text().count(" while(") == loops
    assert executable.memory_analysis().temp_size_in_bytes <= 3 * 4 * integrity._BLOCK_ELEMENTS + 64 * 1024
    assert [int(v) for v in np.asarray(integrity._digest(stacked))] == reference(stacked)



@pytest.mark.parametrize("shape", [(1024, 1024), (16, 1024, 1024)])
def test_a_block_is_digested_by_reductions_that_read_its_bits_in_place(shape):
    """XLA:CPU rewrites a sum over an axis longer than 32 into `reduce-window` kernels that do not fuse their
    operands, so the bits and the weighted bits were written out in full before being summed (a 1.2 GB state's
    fingerprint took 0.18-0.29 s, most of an async save's blocking). Summed in stages of axes of at most 32, each
    sum reads the array itself: no reduce-window, and scratch of a small fraction of a block."""
    leaf = jax.random.normal(jax.random.key(8), shape)
    executable = compiled_digest(leaf)
    assert "reduce-window" not in executable.as_text()
    assert executable.memory_analysis().temp_size_in_bytes <= 4 * integrity._BLOCK_ELEMENTS // 8
    assert [int(v) for v in np.asarray(integrity._digest(leaf))] == reference(leaf)

def test_flat_positions_are_row_major_indices():
    for shape in [(), (5,), (3, 5, 7), (2, 1, 4, 3)]:
        expected = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
        np.testing.assert_array_equal(np.asarray(integrity._flat_positions(shape)), expected)


def test_one_changed_element_changes_the_digest():
    values = np.random.default_rng(1).standard_normal((16, 32), dtype=np.float32)
    saved = integrity.fingerprint({"w": jnp.asarray(values)})
    damaged = values.copy()
    damaged.view(np.uint32)[5, 7] ^= 1 << 3  # one flipped mantissa bit
    assert integrity.fingerprint({"w": jnp.asarray(damaged)})["w"] != saved["w"]
    with pytest.raises(integrity.CorruptCheckpointError, match=r"\bw\b"):
        integrity.verify({"w": jnp.asarray(damaged)}, saved, where="step 3")


def test_two_swapped_elements_change_the_position_weighted_digest_and_are_refused():
    values = np.random.default_rng(2).standard_normal((16, 32), dtype=np.float32)
    saved = integrity.fingerprint({"w": jnp.asarray(values)})["w"]
    swapped = values.copy()
    swapped[2, 3], swapped[9, 30] = values[9, 30], values[2, 3]
    digest = integrity.fingerprint({"w": jnp.asarray(swapped)})["w"]
    assert digest[0] == saved[0] and digest[1] != saved[1]  # same bits, moved
    with pytest.raises(integrity.CorruptCheckpointError, match=r"1 array\(s\) differ from what was saved \(w\)"):
        integrity.verify({"w": jnp.asarray(swapped)}, {"w": saved}, where="step 3")  # not only the plain sum compared
    integrity.verify({"w": jnp.asarray(values)}, {"w": saved}, where="step 3")  # the original still passes


# ----------------------------------------------------------------------------- 8 devices, in a subprocess
def big_array() -> np.ndarray:
    return np.random.default_rng(3).standard_normal(BIG, dtype=np.float32)


def stacked_array() -> np.ndarray:
    return np.random.default_rng(8).standard_normal(STACKED, dtype=np.float32)


LAYOUTS = {  # the same leaves replicated, split along one mesh axis, and along both
    "replicated": {},
    "one axis": {"float32": P("fsdp"), "bfloat16": P(None, "tensor"), "int32": P("tensor"), "bool": P(None, "fsdp"),
                 "key": P("tensor")},
    "two axes": {"float32": P("tensor", "fsdp"), "bfloat16": P("fsdp", "tensor"), "int32": P("tensor", "fsdp"),
                 "bool": P("fsdp", "tensor"), "key": P(("fsdp", "tensor"))},
}


def layout_samples() -> dict[str, jax.Array]:
    rng = np.random.default_rng(4)
    return {
        "float32": jnp.asarray(rng.standard_normal((16, 24), dtype=np.float32)),
        "bfloat16": jnp.asarray(rng.standard_normal((8, 12, 3)).astype(jnp.bfloat16)),
        "int32": jnp.asarray(rng.integers(-2**31, 2**31, (8, 4), dtype=np.int32)),
        "bool": jnp.asarray(rng.random((2, 8)) < 0.5),
        "key": jax.random.split(jax.random.key(1), 8),
    }


def many_leaves() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {f"w{i}": rng.standard_normal((8, 16), dtype=np.float32) for i in range(200)}


def compiled_facts(x: jax.Array) -> dict:
    """The digest of `x` as compiled: its collectives, scratch and loops, `x`'s shard size, whether it kept `x`'s
    layout, and the digest itself."""
    executable = compiled_digest(x)
    text = executable.as_text()
    return {"counts": {op: text.count(op) for op in COLLECTIVES},
            "temp_bytes": executable.memory_analysis().temp_size_in_bytes,
            "shard_bytes": x.addressable_shards[0].data.nbytes,
            "input_sharding_kept": executable.input_shardings[0][0].is_equivalent_to(x.sharding, x.ndim),
            "digest": integrity.fingerprint({"w": x})["w"],
            "loops": text.count(" while(")}


def multi_device_facts() -> dict:
    """Compiled collectives and scratch of the digest of BIG per layout, and digests per layout."""
    from jax.sharding import NamedSharding

    from easytrain.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    big = big_array()
    compiled = {}
    for spec in (P("fsdp", "tensor"), P("tensor", "fsdp"), P(None, "tensor"), P(("fsdp", "tensor"), None)):
        compiled[str(spec)] = compiled_facts(jax.device_put(big, NamedSharding(mesh, spec)))
    # An axis over three devices: the staged sums' view would move data between them, so it is summed as it is.
    six = jax.sharding.Mesh(np.array(jax.devices()[:6]).reshape(3, 2), ("fsdp", "tensor"))
    three_way = jax.device_put(big[:THREE_WAY_ROWS], NamedSharding(six, P("fsdp", "tensor")))
    compiled["three_way"] = compiled_facts(three_way)
    stacked = compiled_facts(jax.device_put(stacked_array(), NamedSharding(mesh, P(None, "fsdp", "tensor"))))
    compiled["stacked"] = {**stacked, "shard_bytes": stacked["shard_bytes"] // STACKED[0]}  # one layer's: a block
    damaged = big.copy()
    damaged.view(np.uint32)[700, 3000] ^= 1
    damaged_digest = integrity.fingerprint({"w": jax.device_put(damaged, NamedSharding(mesh, P("fsdp", "tensor")))})

    layouts = {}
    for name, specs in LAYOUTS.items():
        state = {key: jax.device_put(leaf, NamedSharding(mesh, specs.get(key, P())))
                 for key, leaf in layout_samples().items()}
        layouts[name] = {"digests": integrity.fingerprint(state),
                         "shard_fraction": {key: leaf.addressable_shards[0].data.size / leaf.size
                                            for key, leaf in state.items()}}
    # Far more leaves than XLA:CPU runs in flight per device (32): queued all at once, a save deadlocked.
    many = {key: jax.device_put(leaf, NamedSharding(mesh, P("fsdp", "tensor"))) for key, leaf in many_leaves().items()}
    return {"compiled": compiled, "damaged": damaged_digest["w"], "layouts": layouts,
            "many_leaves": integrity.fingerprint(many)}


@pytest.fixture(scope="module")
def facts() -> dict:
    return facts_on_eight_devices(__file__)


def test_sharded_digest_gathers_nothing_and_needs_little_scratch(facts):
    for spec, fact in facts["compiled"].items():
        counts = fact["counts"]
        assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, (spec, counts)
        assert counts["all-reduce"] > 0, spec  # per-shard partial sums, then scalars cross devices
        assert fact["input_sharding_kept"], spec
        # Summed in place (every axis splits into factors of at most 32): partial sums only, a small fraction
        # of the shard. Over three devices, summed as it is: XLA:CPU's reduce-windows write the shard's bits and
        # weighted bits out first (two copies of it, still never the array).
        bound = 2 * fact["shard_bytes"] if spec == "three_way" else fact["shard_bytes"] // 16
        assert fact["temp_bytes"] <= bound + 64 * 1024, (spec, fact)


def test_sharded_digest_equals_the_ravel_formula(facts):
    expected = reference(big_array())
    for spec, fact in facts["compiled"].items():
        want = {"stacked": reference(stacked_array()), "three_way": reference(big_array()[:THREE_WAY_ROWS])}
        assert fact["digest"] == want.get(spec, expected), spec
    assert facts["compiled"]["stacked"]["loops"] == 0  # its axes split into factors of at most 32: summed in place
    damaged = big_array()
    damaged.view(np.uint32)[700, 3000] ^= 1
    assert facts["damaged"] == reference(damaged) != expected


def test_digests_do_not_depend_on_the_layout(facts):
    layouts = facts["layouts"]
    assert set(layouts["replicated"]["shard_fraction"].values()) == {1.0}
    assert set(layouts["one axis"]["shard_fraction"].values()) == {1 / 2, 1 / 4}
    assert set(layouts["two axes"]["shard_fraction"].values()) == {1 / 8}
    expected = {name: reference(leaf) for name, leaf in layout_samples().items()}
    for name, layout in layouts.items():
        assert layout["digests"] == expected, name


def test_a_tree_of_many_sharded_leaves_digests_on_eight_devices(facts):
    assert facts["many_leaves"] == {name: reference(leaf) for name, leaf in many_leaves().items()}


if __name__ == "__main__":
    print(json.dumps(multi_device_facts()))


@pytest.mark.parametrize("dtype", [jnp.int4, jnp.uint4, jnp.float4_e2m1fn])
def test_a_sub_byte_array_is_refused_however_small_or_wherever_it_lies(dtype):
    """A 4-bit type has no bytes of its own to digest: refused by name on the host (a small array, since saves and
    fingerprints digest those in NumPy) as on the device (a large one), so whether a state can be fingerprinted does
    not depend on its arrays' sizes or on how many processes hold them."""
    small = jnp.zeros((8,), dtype)
    for host_elements in (0, integrity.SMALL_ON_HOST):
        with pytest.raises(ValueError, match=r"'w' is .*4 bits.* cannot be digested"):
            integrity.fingerprint({"w": small}, host_elements)
