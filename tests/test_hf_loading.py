"""Loading Hugging Face checkpoints at scale (streamed, sharded, bounded host memory) and exporting them.

The memory test runs in a subprocess on 8 CPU devices, the multi-process test in two processes of 4
(both run this file as a script: `python tests/test_hf_loading.py memory|multiprocess ...`).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from easytrain.models import CheckpointError, from_pretrained, init_model, save_pretrained, to_hf_state_dict
from easytrain.models.hf_io import hf_layout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from model_configs import VOCAB, tiny_config  # noqa: E402
from runs import child_env, xla_flags  # noqa: E402

# ~273 MB of float32: big enough that an extra host copy of the checkpoint would show in peak RSS.
BIG = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=8)
FILE_LIMIT = 50_000_000
FSDP_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", None), ("heads", None), ("mlp", None),
              ("norm", None))
KERNEL = "['layers'][0]['mlp']['gate_proj']['kernel']"


# ----------------------------------------------------------------------------- the subprocess side
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_growth_bytes(action):
    """(result, peak RSS growth in bytes) of `action()`: the kernel's high-water mark is reset first."""
    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    result = action()
    return result, (_rss_kib("VmHWM") - before) * 1024


def _file_tensors(directory: Path):
    """(name, tensor) one at a time, across every safetensors file of a checkpoint."""
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def worker(checkpoint: Path, export: Path) -> dict:
    from easytrain.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=8)
    for device in jax.devices():  # start the runtime on every device before measuring
        jax.device_put(np.zeros(8, np.float32), device).block_until_ready()
    model, load_growth = _peak_growth_bytes(lambda: from_pretrained(checkpoint, mesh=mesh, rules=FSDP_RULES))
    _, export_growth = _peak_growth_bytes(lambda: save_pretrained(export, model, model.config,
                                                                  max_shard_size="60MB"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    by_path, layout = traverse_util.flatten_dict(params), hf_layout(model.config)
    mismatched, checked = [], 0
    for name, tensor in _file_tensors(checkpoint):
        path, transpose, _ = layout[name]
        checked += 1
        if not np.array_equal(np.asarray(by_path[path]), tensor.T if transpose else tensor):
            mismatched.append(name)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    specs = {jax.tree_util.keystr(p): str(v.sharding.spec) for p, v in leaves}
    shard_shapes = {jax.tree_util.keystr(p): list(v.addressable_shards[0].data.shape) for p, v in leaves}
    source = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    export_mismatched, exported = [], set()
    for name, tensor in _file_tensors(export):
        exported.add(name)
        with safe_open(checkpoint / source[name], framework="numpy") as handle:
            if not np.array_equal(tensor, handle.get_tensor(name)):
                export_mismatched.append(name)
    return {"load_growth": load_growth, "export_growth": export_growth, "checked": checked,
            "mismatched": mismatched, "export_mismatched": export_mismatched + sorted(source.keys() - exported),
            "specs": specs, "shard_shapes": shard_shapes, "devices": len(jax.devices())}


def multiprocess_worker(checkpoint: Path, export: Path, coordinator: str, index: int) -> dict:
    """One of two processes: load onto a mesh spanning both, then export together (process 0 writes)."""
    from easytrain.sharding import make_mesh

    jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=index)
    model = from_pretrained(checkpoint, mesh=make_mesh(data=1, fsdp=8))
    kernel = model.layers[0].mlp.gate_proj.kernel[...]
    save_pretrained(export, model, model.config, max_shard_size="100KB")
    return {"process": jax.process_index(), "fully_addressable": kernel.is_fully_addressable,
            "local_rows": sorted(s.index[0].start for s in kernel.addressable_shards)}


# ----------------------------------------------------------------------------- the test side
def run_script(*args: str, devices: int) -> subprocess.Popen:
    """This file as a script; it writes its result as JSON to the path given last (gloo shares stdout)."""
    env = child_env(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, __file__, *args], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def result_of(process: subprocess.Popen) -> dict:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(Path(process.args[-1]).read_text())


def write_big_checkpoint(directory: Path) -> int:
    """Random float32 Llama weights in several safetensors files plus an index, one file in memory at a time."""
    config = transformers.LlamaConfig(**BIG)
    config.save_pretrained(directory)
    shapes = {name: hf_shape for name, (_, _, hf_shape) in hf_layout(config).items()}
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        if current and size + nbytes > FILE_LIMIT:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    rng, weight_map, total = np.random.default_rng(0), {}, 0
    for i, names in enumerate(groups, start=1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: rng.random(shapes[name], dtype=np.float32) for name in names}
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


@pytest.fixture(scope="module")
def big_load(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    checkpoint, export = root / "checkpoint", root / "export"
    checkpoint.mkdir()
    total = write_big_checkpoint(checkpoint)
    try:
        report = result_of(run_script("memory", str(checkpoint), str(export), str(root / "result.json"), devices=8))
        files = sorted(p.name for p in export.iterdir())
        index = json.loads((export / "model.safetensors.index.json").read_text())
    finally:
        shutil.rmtree(root)  # ~550 MB; pytest would keep it around for three sessions
    print(f"\npeak RSS growth: load {report['load_growth'] / total:.2f}x, export "
          f"{report['export_growth'] / total:.2f}x of the {total / 1e6:.0f} MB checkpoint")
    return {**report, "total": total, "files": files, "index": index}


@pytest.mark.slow
def test_streamed_load_peak_host_memory_stays_below_one_and_a_half_checkpoints(big_load):
    # On CPU the 8 "devices" are host memory, so the loaded (sharded) parameters count once; a host copy
    # of the whole checkpoint on top of them would push the ratio to 2 or more.
    assert big_load["total"] > 250e6
    assert big_load["load_growth"] <= 1.5 * big_load["total"], big_load["load_growth"] / big_load["total"]


@pytest.mark.slow
def test_streamed_load_equals_the_files_and_is_sharded_over_the_mesh(big_load):
    assert big_load["devices"] == 8
    assert big_load["checked"] == 4 * 9 + 3 and big_load["mismatched"] == []
    specs, shapes = big_load["specs"], big_load["shard_shapes"]
    assert specs[KERNEL] == str(P("fsdp", None)) and shapes[KERNEL] == [1024 // 8, 2816]
    assert specs["['embed_tokens']['embedding']"] == str(P(None, "fsdp"))
    assert shapes["['embed_tokens']['embedding']"] == [8192, 1024 // 8]
    assert specs["['norm']['scale']"] == str(P(None)) and shapes["['norm']['scale']"] == [1024]


@pytest.mark.slow
def test_export_of_sharded_params_reproduces_the_checkpoint_in_bounded_memory(big_load):
    assert big_load["export_mismatched"] == []
    shards = [f for f in big_load["files"] if f.endswith(".safetensors")]
    assert len(shards) >= 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert big_load["index"]["metadata"]["total_size"] == big_load["total"]
    assert sorted(set(big_load["index"]["weight_map"].values())) == shards
    # One shard file of tensors (<= 60 MB here) plus one tensor in flight, far below a whole copy.
    assert big_load["export_growth"] <= 0.5 * big_load["total"], big_load["export_growth"] / big_load["total"]


# ----------------------------------------------------------------------------- export, in process
def randomised_model(config, seed: int = 0):
    model = init_model(config, seed=seed)
    rng = np.random.RandomState(seed)
    state = nnx.state(model, nnx.Param)
    noisy = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, noisy)
    nnx.update(model, state)
    return model


def logits_of(model, ids_BT: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids_BT)))


def torch_logits(reference, ids_BT: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return reference(torch.tensor(ids_BT)).logits.float().numpy()


IDS_BT = np.random.RandomState(3).randint(0, VOCAB, (2, 10))


def test_sharded_export_has_transformers_layout_and_same_logits(tmp_path):
    pytest.importorskip("torch")
    config = tiny_config(attention_bias=True)
    model = randomised_model(config)
    save_pretrained(tmp_path, model, config, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    stored = {name: tensor for shard in shards for name, tensor in load_file(tmp_path / shard).items()}
    assert index["weight_map"].keys() == stored.keys()
    assert all(index["weight_map"][name] == shard for shard in shards for name in load_file(tmp_path / shard))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    assert all(t.nbytes <= 100_000 for t in stored.values())
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(logits_of(model, IDS_BT), torch_logits(reference, IDS_BT), atol=1e-4, rtol=0)


def test_bfloat16_export_loads_in_transformers_as_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    config = tiny_config()
    model = randomised_model(config, seed=1)
    save_pretrained(tmp_path, model, config, dtype="bfloat16")
    stored = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reference.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = np.asarray(model.layers[1].mlp.down_proj.kernel[...]).T.astype(ml_dtypes.bfloat16)
    theirs = reference.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(ours.astype(np.float32), theirs)


def test_generation_config_is_derived_from_the_config_or_written_as_given(tmp_path):
    config = tiny_config(bos_token_id=4, eos_token_id=5, pad_token_id=0)
    params = nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param))
    save_pretrained(tmp_path / "derived", params, config)
    derived = transformers.GenerationConfig.from_pretrained(tmp_path / "derived")
    assert (derived.bos_token_id, derived.eos_token_id, derived.pad_token_id) == (4, 5, 0)
    given = transformers.GenerationConfig(eos_token_id=[5, 6], max_new_tokens=7, do_sample=False)
    save_pretrained(tmp_path / "given", params, config, generation_config=given)
    written = transformers.GenerationConfig.from_pretrained(tmp_path / "given")
    assert written.eos_token_id == [5, 6] and written.max_new_tokens == 7


def test_tokenizer_with_chat_template_round_trips(tmp_path, tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)  # a private copy to modify
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    config = tiny_config(vocab_size=len(tokenizer))
    save_pretrained(tmp_path, init_model(config), config, tokenizer=tokenizer)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "The quick brown fox."}]
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.apply_chat_template(messages, tokenize=False) == "<s>user: The quick brown fox.</s>"
    assert reloaded("a journey")["input_ids"] == tokenizer("a journey")["input_ids"]


def test_max_shard_size_takes_bytes_and_a_resave_replaces_old_shards(tmp_path):
    config = tiny_config()
    params = nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param))
    save_pretrained(tmp_path, params, config, max_shard_size=50_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 4
    save_pretrained(tmp_path, params, config)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with pytest.raises(CheckpointError, match="max_shard_size='lots'"):
        save_pretrained(tmp_path, params, config, max_shard_size="lots")
    with pytest.raises(CheckpointError, match="max_shard_size=0"):
        save_pretrained(tmp_path, params, config, max_shard_size=0)


# ----------------------------------------------------------------------------- loading, in process
def test_sharded_transformers_checkpoint_loads_with_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(tiny_config(mlp_bias=True)).eval()
    reference.save_pretrained(tmp_path, max_shard_size="60KB")
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 3
    model = from_pretrained(tmp_path)
    kernel = model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.devices() == {jax.devices()[0]} and not kernel.committed  # free to move onto a mesh
    np.testing.assert_allclose(logits_of(model, IDS_BT), torch_logits(reference, IDS_BT), atol=1e-4, rtol=0)


def test_names_and_shapes_are_checked_before_any_tensor_data_is_read(tmp_path, monkeypatch):
    from easytrain.models import hf_load

    config = tiny_config()
    tensors = to_hf_state_dict(nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config)
    del tensors["model.norm.weight"]
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((127, 64), np.float32)
    config.save_pretrained(tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data was read before the names and shapes were checked")

    monkeypatch.setattr(hf_load, "_place", no_data)
    monkeypatch.setattr(hf_load, "_check_tied_head_values", no_data)
    with pytest.raises(CheckpointError, match=r"missing \(1\): model.norm.weight.*\(127, 64\)"):
        from_pretrained(tmp_path)


def test_index_naming_a_shard_that_is_absent_is_reported(tmp_path):
    config = tiny_config()
    save_pretrained(tmp_path, init_model(config), config, max_shard_size="100KB")
    second = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(CheckpointError, match=second.name):
        from_pretrained(tmp_path)


def test_hub_name_without_network_fails_naming_it_and_suggesting_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so the name cannot be a relative directory
    with pytest.raises(CheckpointError, match=r"'easytrain-tests/no-such-model'.*local checkpoint directory"):
        from_pretrained("easytrain-tests/no-such-model")


@pytest.mark.slow
def test_two_processes_load_onto_a_shared_mesh_and_export_together(tmp_path):
    config = tiny_config()
    save_pretrained(tmp_path / "source", randomised_model(config, seed=2), config)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{sock.getsockname()[1]}"
    processes = [run_script("multiprocess", str(tmp_path / "source"), str(tmp_path / "export"), coordinator,
                            str(index), str(tmp_path / f"result{index}.json"), devices=4) for index in range(2)]
    first, second = (result_of(p) for p in processes)
    assert (first["process"], second["process"]) == (0, 1)
    assert not first["fully_addressable"] and first["local_rows"] != second["local_rows"]
    source = load_file(tmp_path / "source" / "model.safetensors")
    shards = sorted((tmp_path / "export").glob("model-*-of-*.safetensors"))
    exported = {name: t for shard in shards for name, t in load_file(shard).items()}
    assert len(shards) >= 3 and exported.keys() == source.keys()
    for name, tensor in source.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


if __name__ == "__main__":
    mode, *rest, result_file = sys.argv[1:]
    if mode == "memory":
        result = worker(Path(rest[0]), Path(rest[1]))
    else:
        result = multiprocess_worker(Path(rest[0]), Path(rest[1]), rest[2], int(rest[3]))
    Path(result_file).write_text(json.dumps(result))
