"""The work a trainer's set-up and first steps do: each program traced once, not again for a question its first
trace already answered."""

import pytest

from easytrain import BaseTrainer, TrainingArguments


def small_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=16, train_batch_size=4, eval_batch_size=4, max_steps=1,
                  logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=8)
    return TrainingArguments(**(values | overrides))


class CountingTrainer(BaseTrainer):
    """Counts the traces of its loss in evaluation mode: one per trace of the eval step."""

    eval_traces = 0

    def compute_loss(self, model, batch, rng, train, frozen):
        if not train:
            type(self).eval_traces += 1
        return super().compute_loss(model, batch, rng, train, frozen)


def test_the_eval_step_is_traced_once_for_its_metric_names_and_its_evaluations(tmp_path):
    CountingTrainer.eval_traces = 0
    trainer = CountingTrainer(small_args(tmp_path))
    trainer.setup()  # the eval metrics' names are checked here, from a trace of the eval step
    first = trainer.evaluate()
    assert CountingTrainer.eval_traces == 1
    assert trainer.evaluate() == first  # the same program, the same state
    assert CountingTrainer.eval_traces == 1


def test_a_lora_runs_base_fingerprint_digests_its_small_arrays_on_the_host(tmp_path, monkeypatch):
    """The frozen base's fingerprint (what a resume must find again) is taken at every LoRA set-up: a digest program
    compiled per shape for arrays NumPy digests to the same values in less time than the program takes to launch."""
    import transformers

    from easytrain import integrity
    from easytrain.models import init_model, save_pretrained
    from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
    from easytrain.trainers.sft import SFTArguments, SFTTrainer

    tokenizer = build_arithmetic_chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_pretrained(tmp_path / "base", init_model(config), config)
    tokenizer.save_pretrained(tmp_path / "base")
    on_device, digest = [], integrity._digest
    monkeypatch.setattr(integrity, "_digest", lambda leaf: on_device.append(leaf.shape) or digest(leaf))
    trainer = SFTTrainer(small_args(tmp_path, model_name_or_path=str(tmp_path / "base"), lora_rank=4), SFTArguments())
    trainer.setup()
    assert trainer.base_fingerprint and on_device == []


PLACE_IN_PROCESSES = '''
import json, os, sys
import jax
address, count, index = sys.argv[1:4]
jax.distributed.initialize(address, int(count), int(index))
import optax
from flax import nnx
from easytrain.placement import create_state
from easytrain.sharding import make_mesh

compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)


class Tiny(nnx.Module):
    def __init__(self, rngs):
        sharded = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        self.sharded = nnx.Linear(8, 4, kernel_init=sharded, rngs=rngs)
        self.replicated = nnx.Linear(4, 2, rngs=rngs)
        self.norm = nnx.LayerNorm(2, rngs=rngs)


mesh = make_mesh(data=-1, fsdp=int(sys.argv[4]))
state, shardings = create_state(lambda: Tiny(nnx.Rngs(0)), optax.adamw(1e-3), seed=0, mesh=mesh)
jax.block_until_ready(state)
labelled = all(leaf.sharding == want for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
print(json.dumps({"compiles": len(compiles), "labelled": labelled}))
'''


@pytest.mark.parametrize("fsdp", [1, 2], ids=["data_parallel", "fsdp"])
def test_processes_place_a_fresh_state_with_its_one_init_program(tmp_path, fsdp):
    """Over several processes (arrays no process fully addresses) the fresh state is the init program's own output,
    already in the layout's shardings: no reshard program compiled, and no copy made, per leaf to label it (each copy
    would hold a second state in memory at set-up)."""
    import json
    import subprocess
    import sys

    from runs import child_env, xla_flags
    from test_multiprocess import free_port

    script = tmp_path / "place.py"
    script.write_text(PLACE_IN_PROCESSES)
    env = child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(script), address, "2", str(index), str(fsdp)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for index in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))
    assert results == [{"compiles": 1, "labelled": True}] * 2
