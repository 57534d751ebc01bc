"""The work a run's evaluations and its end do: each export, program and encoding done once, not again per call."""

import json
import tracemalloc

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from easytrain import lora
from easytrain.evaluators import ExactMatch
from easytrain.lora_config import LoRAConfig
from easytrain.models import hf_export, init_model, save_pretrained
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer

CONFIG = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def programs() -> dict[str, list[str]]:
    """The functions traced to jaxprs (jitted or `eval_shape`d) and lowered to XLA programs while the test runs."""
    found: dict[str, list[str]] = {"traced": [], "lowered": []}
    kinds = {"/jax/core/compile/jaxpr_trace_duration": "traced",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowered"}

    def listen(event: str, duration: float, **fields) -> None:
        if event in kinds:
            found[kinds[event]].append(str(fields.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield found
    jax.monitoring.unregister_event_duration_listener(listen)


def test_a_second_merge_of_a_lora_model_traces_and_lowers_nothing(programs):
    """A LoRA run's export merges each adapted kernel: one program per kernel shape and placement, kept, not a new
    jitted function per layer and per export (14 lowered at every export of a two-layer model before), and one
    shape-only layer per layout to clone (its initialisers traced per layer and per export before)."""
    model = lora.apply_lora(init_model(CONFIG), LoRAConfig(rank=4))
    first = lora.merge_lora(model)
    for found in programs.values():
        found.clear()
    second = lora.merge_lora(model)
    assert programs == {"traced": [], "lowered": []}
    same = jax.tree.map(lambda a, b: bool((a == b).all()), jax.tree.leaves(first), jax.tree.leaves(second))
    assert all(same)


@pytest.mark.parametrize("max_shard_size", ["5GB", 60_000])
def test_an_export_fetches_its_tensors_together_per_shard_file(tmp_path, monkeypatch, max_shard_size):
    """On a GPU each `np.asarray` of a device array waits for its own copy: an export asks for a shard file's
    tensors in one `jax.device_get`, and writes the same files."""
    model = init_model(CONFIG)
    requests, device_get = [], jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda values: requests.append(len(values)) or device_get(values))
    directory = save_pretrained(tmp_path / "export", model, CONFIG, max_shard_size=max_shard_size)
    files = sorted(directory.glob("*.safetensors"))
    written = [load_file(str(file)) for file in files]
    assert requests == [len(tensors) for tensors in written] and len(files) == (1 if max_shard_size == "5GB" else 2)
    expected = {name: np.ascontiguousarray(planned.value.T if planned.transpose else planned.value)
                for name, planned in hf_export.export_plan(
                    jax.tree.map(np.asarray, hf_export._params_of(model)), CONFIG, None).items()}
    assert {name: tensor.tolist() for tensors in written for name, tensor in tensors.items()} == {
        name: tensor.tolist() for name, tensor in expected.items()}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_an_exports_transfers_are_bounded_in_the_bytes_they_move(tmp_path, monkeypatch, scan_layers):
    """A transfer moves the device's arrays, in their own dtype: float32 weights exported as bfloat16 move twice the
    bytes they are written in, so a group is bounded in the former (the device also holds a stacked weight's slices
    of a group at once), not the latter."""
    model = init_model(CONFIG, scan_layers=scan_layers)
    bound = 8192  # the float32 embedding, gate, up and down kernels each; two of them written in bfloat16
    monkeypatch.setattr(hf_export, "_FETCH_GROUP_BYTES", bound)
    requests, device_get = [], jax.device_get
    monkeypatch.setattr(jax, "device_get",
                        lambda values: requests.append([v.nbytes for v in values]) or device_get(values))
    save_pretrained(tmp_path / "export", model, CONFIG, dtype="bfloat16")
    assert sum(len(request) for request in requests) == 21
    assert [request for request in requests if sum(request) > bound and len(request) > 1] == []


@pytest.mark.parametrize("copied", [False, True])
def test_a_fetched_groups_host_copies_are_dropped_as_they_are_converted(monkeypatch, copied):
    """The host holds a group's fetched arrays once: each is used as fetched when one block holds it whole (not copied
    into another array) and dropped once converted, so a group costs its fetched bytes plus one converted tensor over
    the shard file's tensors, not two copies of the group and its conversions. XLA:CPU's fetch may alias the device
    buffer (no host bytes); `copied` fetches into new host memory, as from a GPU."""
    if copied:
        device_get = jax.device_get
        monkeypatch.setattr(jax, "device_get", lambda values: [np.array(v, copy=True) for v in device_get(values)])
    values = {f"t{i}": jax.numpy.full((512, 512), i, jax.numpy.float32) for i in range(8)}  # 1 MiB each
    plan = {name: hf_export._Planned(value, True, np.dtype(jax.numpy.bfloat16)) for name, value in values.items()}
    jax.block_until_ready(list(values.values()))
    tracemalloc.start()
    try:
        tensors = hf_export._fetch(list(plan), plan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [tensor[0, 0] for tensor in tensors.values()] == list(range(8))
    fetched, written, converted = 8 * 2**20, 4 * 2**20, 2**19
    assert peak <= (fetched + converted if copied else written) + 2**16


def test_an_export_fetches_no_parameters_own_array_objects(tmp_path, monkeypatch):
    """Fetching a `jax.Array` keeps its host copy on the object fetched wherever that copy is not an alias of the
    device buffer (on a GPU), and a shard's `data` is the parameter's own array object (a one-device parameter's, the
    parameter itself): an export fetches new objects over the same buffers, so the host keeps no copy of any tensor
    it exported (the model stays in use after a run's export)."""
    from easytrain.models.peft_io import save_peft_adapter

    config = LoRAConfig(rank=4)
    model = lora.apply_lora(init_model(CONFIG), config)
    owned = {id(array) for leaf in jax.tree.leaves(nnx.state(model))
             for array in [leaf, *(shard.data for shard in leaf.addressable_shards)]}
    fetched, device_get = [], jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda values: fetched.extend(values) or device_get(values))
    save_pretrained(tmp_path / "export", lora.merge_lora(model), CONFIG)
    save_peft_adapter(tmp_path / "adapter", model, config, fingerprint=False)
    assert len(fetched) == 21 + 28
    assert [array.shape for array in fetched if id(array) in owned] == []


def test_a_peft_adapters_tensors_are_fetched_together(tmp_path, monkeypatch):
    """The adapter's tensors (a LoRA run's export) are asked for in one `jax.device_get`, not one copy each."""
    from easytrain.models.peft_io import load_peft_adapter, save_peft_adapter

    config = LoRAConfig(rank=4)
    model = lora.apply_lora(init_model(CONFIG), config)
    requests, device_get = [], jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda values: requests.append(len(values)) or device_get(values))
    directory = save_peft_adapter(tmp_path / "adapter", model, config, fingerprint=False)
    written = load_file(str(directory / "adapter_model.safetensors"))
    assert requests == [len(written)] == [28]
    monkeypatch.setattr(jax, "device_get", device_get)
    loaded = load_peft_adapter(directory, init_model(CONFIG, seed=1))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), nnx.state(loaded, nnx.LoRAParam),
                                            nnx.state(model, nnx.LoRAParam))))


def test_an_adapters_base_fingerprint_digests_its_small_arrays_on_the_host(tmp_path, monkeypatch):
    """A LoRA run's adapter export records the base's fingerprint: its small arrays digested in NumPy, to the same
    values, as the set-up's fingerprint of that base is, not with a digest program compiled per shape at the end."""
    from easytrain import integrity
    from easytrain.models.peft_io import FINGERPRINT_KEY, save_peft_adapter

    config = LoRAConfig(rank=4)
    model = lora.apply_lora(init_model(CONFIG), config)
    expected = integrity.fingerprint(lora.base_state(model, config))  # every leaf through the compiled digest
    on_device, digest = [], integrity._digest
    monkeypatch.setattr(integrity, "_digest", lambda leaf: on_device.append(leaf.shape) or digest(leaf))
    directory = save_peft_adapter(tmp_path / "adapter", model, config)
    with safe_open(str(directory / "adapter_model.safetensors"), framework="numpy") as handle:
        assert json.loads(handle.metadata()[FINGERPRINT_KEY]) == expected
    assert on_device == []


class CountingTokenizer:
    """The arithmetic tokenizer, counting the texts it encodes."""

    def __init__(self):
        self.inner, self.encoded = build_arithmetic_chat_tokenizer(), []

    def __call__(self, text, **kwargs):
        self.encoded.append(text)
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def counting_tokenizer_and_trainer():
    """A counting tokenizer and a stand-in trainer holding a one-layer Llama (what ExactMatch reads)."""
    tokenizer = CountingTokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer.inner), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return tokenizer, type("Trainer", (), {"model": init_model(config)})()


def test_exact_match_encodes_its_prompts_once_for_every_evaluation():
    """The prompts are the same at every evaluation: encoded at the first, not again at each."""
    tokenizer, trainer = counting_tokenizer_and_trainer()
    evaluator = ExactMatch(["1+2=", "3+4="], ["3", "7"], tokenizer)
    tokenizer.encoded.clear()  # the answers' lengths, read once at construction
    first = evaluator(trainer)
    assert evaluator(trainer) == first
    assert tokenizer.encoded == ["1+2=", "3+4="]


def test_exact_match_follows_prompts_edited_after_an_evaluation():
    """An evaluator's prompts may be edited between evaluations (in place or replaced): the next evaluation generates
    from the new ones, as a new evaluator would, not from the encodings of the first."""
    tokenizer, trainer = counting_tokenizer_and_trainer()
    evaluator = ExactMatch(["1+2=", "3+4="], ["3", "7"], tokenizer)
    evaluator(trainer)
    evaluator.prompts.append("5+6=")
    evaluator.answers.append("11")
    tokens = evaluator.max_new_tokens  # set from the answers given at construction
    grown = ExactMatch(["1+2=", "3+4=", "5+6="], ["3", "7", "11"], tokenizer, max_new_tokens=tokens)
    assert evaluator.completions(trainer) == grown.completions(trainer)
    evaluator.prompts, evaluator.answers = ["2+2="], ["4"]
    fresh = ExactMatch(["2+2="], ["4"], tokenizer, max_new_tokens=tokens)
    tokenizer.encoded.clear()
    assert evaluator.completions(trainer) == fresh.completions(trainer)
    assert tokenizer.encoded == ["2+2=", "2+2="]  # this evaluator's new prompt, then the fresh one's
    evaluator(trainer)
    assert tokenizer.encoded == ["2+2=", "2+2="]  # not encoded again while unchanged
