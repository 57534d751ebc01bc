"""LoRA adapters: their configuration, identity at init, what trains, sharding axes, the docs page's examples
(PEFT round trips: test_lora_peft.py). Run as a script
(`python tests/test_lora.py mesh OUT.json`) it is the multi-device worker of the mesh test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))

from easytrain import lora
from easytrain.lora import LoRAConfig, LoRAConfigError, LoRADense, LoRAError
from easytrain.models import from_pretrained
from easytrain.sharding import MESH_AXES, logical_to_spec

from lora_models import LLAMA, VOCAB, ids_batch, logits, randomise_adapters, write_base
from runs import child_env, xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("llama"), LLAMA)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, field", [
    (dict(rank=0), "rank"), (dict(rank=-2), "rank"), (dict(rank=2.5), "rank"), (dict(rank=True), "rank"),
    (dict(alpha=0), "alpha"), (dict(alpha=-1.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(target_modules=[]), "target_modules"), (dict(target_modules=""), "target_modules"),
    (dict(target_modules="q_proj(("), "target_modules"), (dict(target_modules=["q_proj", 3]), "target_modules"),
    (dict(init_a="xavier"), "init_a"), (dict(param_dtype="int8"), "param_dtype"),
])
def test_bad_config_values_fail_naming_the_field(overrides, field):
    with pytest.raises(LoRAConfigError) as error:
        LoRAConfig(**overrides)
    assert error.value.field == field and str(error.value).startswith(field + ":")


def test_scaling_is_alpha_over_rank_or_its_square_root():
    assert LoRAConfig(rank=8, alpha=16).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=8, use_rslora=True).scaling == 2.0
    assert LoRAConfig(target_modules={"v_proj", "q_proj"}).target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("targets, shown", [
    (["q_proj", "qkv_proj"], "['qkv_proj']"),
    (r"layers\.\d+\.self_attn\.q_proj", "matches no dense layer"),  # a pattern must match the whole name
    (["embed_tokens"], "not dense layers"),
    (r".*norm", "not dense layers"),
])
def test_targets_that_select_no_dense_layer_fail_naming_target_modules(llama_dir, targets, shown):
    model = from_pretrained(llama_dir)
    with pytest.raises(LoRAConfigError) as error:
        lora.apply_lora(model, LoRAConfig(target_modules=targets))
    assert error.value.field == "target_modules" and shown in str(error.value)
    assert not lora.lora_modules(model)


# ----------------------------------------------------------------------------- the adapted model


def test_adapters_start_as_identity_on_the_same_buffers_and_train_through_b(llama_dir):
    model = from_pretrained(llama_dir)
    ids = ids_batch()
    before = logits(model, ids)
    kernels = {name: m.kernel.get_value() for name, m in nnx.iter_modules(model) if isinstance(m, nnx.Module)
               and hasattr(m, "kernel")}
    pointers = {name: k.unsafe_buffer_pointer() for name, k in kernels.items()}
    lora.apply_lora(model, LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(3))
    assert np.array_equal(logits(model, ids), before)  # B = 0: exactly the base model
    adapted = lora.lora_modules(model)
    assert len(adapted) == 2 * 7 and all(isinstance(m, LoRADense) for m in adapted.values())
    for name, module in nnx.iter_modules(model):
        if hasattr(module, "kernel"):  # same variables, same device buffers: no copy of the base
            assert module.kernel.get_value().unsafe_buffer_pointer() == pointers[name]
    q = model.layers[0].self_attn.q_proj
    a = np.asarray(q.lora_a.get_value())
    assert a.shape == (64, 4) and np.abs(a).max() <= 1 / np.sqrt(64) and a.std() > 0.3 / np.sqrt(64)
    assert not np.any(np.asarray(q.lora_b.get_value()))
    q.lora_b.set_value(jnp.full(q.lora_b.shape, 0.05))
    assert np.abs(logits(model, ids) - before).max() > 1e-3
    with lora.adapters_disabled(model):  # the base model without a second copy (DPO's reference)
        assert np.array_equal(logits(model, ids), before)

    @jax.jit
    def both(state):
        module = nnx.merge(graphdef, state)
        with lora.adapters_disabled(module):
            base = module(jnp.asarray(ids))
        return base, module(jnp.asarray(ids))

    graphdef, state = nnx.split(model)
    base, adapted = both(state)
    np.testing.assert_allclose(np.asarray(base), before, atol=1e-5)
    np.testing.assert_allclose(np.asarray(adapted), logits(model, ids), atol=1e-5)
    with pytest.raises(LoRAError, match="already have adapters"):
        lora.apply_lora(model, LoRAConfig(rank=4, alpha=8))


def adapter_size(model) -> int:
    return sum(m.rank * sum(m.kernel.shape) for m in lora.lora_modules(model).values())


@pytest.mark.parametrize("extra", [{}, dict(train_embeddings=True), dict(train_norms=True),
                                   dict(train_embeddings=True, train_norms=True)])
def test_trainable_filter_selects_adapters_and_only_the_requested_extras(llama_dir, extra):
    config = LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **extra)
    model = lora.apply_lora(from_pretrained(llama_dir), config)
    _, trained, frozen = nnx.split(model, lora.lora_trainable(config), ...)
    hidden, layers = 64, 2
    expected = layers * 4 * ((64 + 64) + (64 + 32) + (128 + 64))
    assert adapter_size(model) == expected
    if config.train_embeddings:
        expected += 2 * VOCAB * hidden  # embed_tokens and the untied lm_head
    if config.train_norms:
        expected += (2 * layers + 1) * hidden
    assert lora.count_params(nnx.to_pure_dict(trained)) == expected
    assert lora.count_params(lora.adapter_state(model, config)) == expected
    total = lora.count_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert lora.count_params(nnx.to_pure_dict(frozen)) == total - expected
    assert lora.lora_trainable(config) == lora.lora_trainable(LoRAConfig(**config.__dict__))
    # Gradients reach the adapters only; at init only B gets one (A's gradient is multiplied by B = 0).
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(jnp.asarray(ids_batch()))
        return jnp.mean(jax.nn.logsumexp(out, axis=-1))

    grads = nnx.to_pure_dict(jax.grad(loss)(params))["layers"][0]["self_attn"]["q_proj"]
    assert set(grads) == {"lora_a", "lora_b"}
    assert not np.any(np.asarray(grads["lora_a"])) and np.abs(np.asarray(grads["lora_b"])).max() > 0


def test_adapter_axes_follow_the_kernel_they_adapt(llama_dir):
    model = lora.apply_lora(from_pretrained(llama_dir), LoRAConfig(rank=4, alpha=8))
    mesh = AbstractMesh((1, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    for name, module in lora.lora_modules(model).items():
        in_axis, out_axis = module.kernel.get_metadata()["out_sharding"]
        assert module.lora_a.get_metadata()["out_sharding"] == (in_axis, None), name
        assert module.lora_b.get_metadata()["out_sharding"] == (None, out_axis), name
        kernel_spec = logical_to_spec((in_axis, out_axis), module.kernel.shape, mesh)
        assert logical_to_spec((in_axis, None), module.lora_a.shape, mesh) == P(kernel_spec[0], None)
        assert logical_to_spec((None, out_axis), module.lora_b.shape, mesh) == P(None, kernel_spec[1])
    o_proj = model.layers[0].self_attn.o_proj
    assert logical_to_spec(o_proj.lora_a.get_metadata()["out_sharding"], o_proj.lora_a.shape, mesh) == P("tensor", None)
    assert logical_to_spec(o_proj.lora_b.get_metadata()["out_sharding"], o_proj.lora_b.shape, mesh) == P(None, "fsdp")


def test_dropout_is_off_in_eval_and_draws_from_the_module_stream_in_train(llama_dir):
    config = LoRAConfig(rank=4, alpha=8, dropout=0.5)
    model = lora.apply_lora(from_pretrained(llama_dir), config, rngs=nnx.Rngs(params=0, dropout=1))
    randomise_adapters(model)
    ids = jnp.asarray(ids_batch())
    model.eval()
    first, second = np.asarray(model(ids)), np.asarray(model(ids))
    assert np.array_equal(first, second)
    np.testing.assert_allclose(first, logits(lora.merge_lora(model), ids_batch()), atol=1e-5)
    streams = nnx.to_pure_dict(nnx.state(model, nnx.RngState))
    assert streams and not nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.RngState, lora.lora_trainable(config))))
    model.train()
    noisy_1, noisy_2 = np.asarray(model(ids)), np.asarray(model(ids))
    assert np.abs(noisy_1 - first).max() > 1e-3 and np.abs(noisy_1 - noisy_2).max() > 1e-3
    counts = nnx.to_pure_dict(nnx.state(model, nnx.RngCount))
    assert {int(c) for c in jax.tree.leaves(counts)} == {2}  # each layer's stream advanced once per call


def test_cached_decoding_runs_through_the_adapters(llama_dir):
    model = lora.apply_lora(from_pretrained(llama_dir), LoRAConfig(rank=4, alpha=8))
    randomise_adapters(model)
    ids = jnp.asarray(ids_batch())
    full = logits(model, np.asarray(ids))
    prefill, cache = model.decode(ids[:, :6], model.init_cache(2, 16))
    step, _ = model.decode(ids[:, 6:7], cache)
    np.testing.assert_allclose(np.asarray(prefill), full[:, :6], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step), full[:, 6:7], atol=1e-5)


def test_bfloat16_base_keeps_float32_adapters_and_merges_in_its_own_dtype(llama_dir):
    model = from_pretrained(llama_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    lora.apply_lora(model, LoRAConfig(rank=4, alpha=8))
    q = model.layers[0].self_attn.q_proj
    assert q.lora_a.get_value().dtype == jnp.float32 and q.kernel.get_value().dtype == jnp.bfloat16
    assert q(jnp.ones((3, 64), jnp.bfloat16)).dtype == jnp.bfloat16  # activations keep the compute dtype
    same = lora.apply_lora(from_pretrained(llama_dir, param_dtype=jnp.bfloat16), LoRAConfig(param_dtype=None))
    assert same.layers[0].self_attn.q_proj.lora_b.get_value().dtype == jnp.bfloat16
    randomise_adapters(model)
    merged = lora.merge_lora(model).layers[0].self_attn.q_proj.kernel.get_value()
    expected = q.kernel.get_value().astype(jnp.float32) + q.delta()
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(merged, np.float32), np.asarray(expected), atol=2e-2)


def test_adapter_state_and_base_fingerprint(llama_dir):
    model = lora.apply_lora(from_pretrained(llama_dir), LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"]))
    state = lora.adapter_state(model)
    assert set(state["layers"][0]) == {"self_attn"} and set(state["layers"][0]["self_attn"]["q_proj"]) == {
        "lora_a", "lora_b"}
    fingerprint = lora.base_fingerprint(model)
    assert "layers.0.self_attn.q_proj.kernel" in fingerprint and not any("lora" in k for k in fingerprint)
    randomise_adapters(model)
    assert lora.base_fingerprint(model) == fingerprint
    kernel = model.layers[1].mlp.up_proj.kernel
    kernel.set_value(kernel.get_value().at[0, 0].add(1.0))
    changed = [k for k, v in lora.base_fingerprint(model).items() if fingerprint[k] != v]
    assert changed == ["layers.1.mlp.up_proj.kernel"]


def test_lora_page_examples_run(llama_dir, tmp_path, monkeypatch):
    from doc_snippets import python_blocks, run_block

    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(ROOT / "docs" / "lora.md")
    assert len(blocks) >= 5 and 'base_model = "path/to/llama"' in blocks[0].source
    namespace: dict = {}
    for block in blocks:
        source = block.source.replace('"path/to/llama"', repr(str(llama_dir)))
        run_block(type(block)(block.path, block.line, source), namespace)
    model, restored = namespace["model"], namespace["restored"]
    assert sorted(lora.lora_modules(restored)) == sorted(lora.lora_modules(model))
    assert (tmp_path / "runs" / "lora" / "merged" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- on a mesh


@pytest.mark.slow
def test_adapters_are_placed_and_trained_like_their_kernel_on_a_mesh(llama_dir, tmp_path):
    env = child_env(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    out = tmp_path / "mesh.json"
    done = subprocess.run([sys.executable, __file__, "mesh", str(llama_dir), str(out)], env=env, text=True,
                          capture_output=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kernel"] == str(P("fsdp", "tensor"))
    assert result["lora_a"] == str(P("fsdp", None)) and result["lora_b"] == str(P(None, "tensor"))
    assert result["state_lora_a"] == result["lora_a"] and result["state_lora_b"] == result["lora_b"]
    assert result["trainable"] == ["lora_a", "lora_b"]
    assert result["max_difference"] <= 1e-5
    assert result["merged_kernel"] == result["kernel"]


def mesh_worker(base_dir: str, out: str) -> None:
    """On a (data 1, fsdp 2, tensor 2) mesh: adapters land split like their kernel, and the trainer's layout
    (``placement.place_module`` with the LoRA filter) agrees with them; logits match one device."""
    import optax

    from easytrain import placement, sharding

    ids = jnp.asarray(ids_batch(4))
    config = LoRAConfig(rank=4, alpha=8)
    single = lora.apply_lora(from_pretrained(base_dir), config, rngs=1)
    randomise_adapters(single)
    expected = logits(single, np.asarray(ids))
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
    model = lora.apply_lora(from_pretrained(base_dir, mesh=mesh), config, rngs=1)
    randomise_adapters(model)
    spec = lambda x: str(x.sharding.spec)
    fresh = lora.apply_lora(from_pretrained(base_dir, mesh=mesh), config, rngs=1).layers[0].self_attn.q_proj
    state, _ = placement.place_module(model, optax.adam(1e-3), seed=0, mesh=mesh, trainable=lora.lora_trainable(config))
    state_q = state.params["layers"][0]["self_attn"]["q_proj"]
    model.eval()
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(sharding.with_activation_layout(lambda m, x: m(x), mesh))(model, ids))
    merged = lora.merge_lora(model).layers[0].self_attn.q_proj
    Path(out).write_text(json.dumps({
        "kernel": spec(fresh.kernel.get_value()), "lora_a": spec(fresh.lora_a.get_value()),
        "lora_b": spec(fresh.lora_b.get_value()), "state_lora_a": spec(state_q["lora_a"]),
        "state_lora_b": spec(state_q["lora_b"]), "trainable": sorted(state_q),
        "max_difference": float(np.abs(got - expected).max()), "merged_kernel": spec(merged.kernel.get_value())}))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "mesh":
    mesh_worker(sys.argv[2], sys.argv[3])
