"""LoRA through the trainers: what trains, what a checkpoint holds, exact resume after a kill, refusing a
different base, exports that transformers and PEFT load with the same logits, and DPO's adapter-off reference.

The base models are tiny random transformers Llamas saved with the arithmetic chat tokenizer, so the SFT
and DPO tasks train on them offline.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from easytrain import ArgumentError, TrainingArguments, lora, placement
from easytrain.checkpoint import CheckpointManager
from easytrain.cli import main
from easytrain.models import from_pretrained
from easytrain.models.peft_io import save_peft_adapter
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from easytrain.trainers.sft import SFTArguments, SFTTrainer
from runs import child_env, logged

ROOT = Path(__file__).resolve().parents[1]
RANK = 4


def write_base(directory: Path, seed: int = 0) -> Path:
    import torch  # here, not at the top: test_resume_is_exact_after_sigkill's child imports this module without it

    tokenizer = build_arithmetic_chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("base"))


def lora_args(output_dir, base, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), model_name_or_path=str(base), lora_rank=RANK, lora_dropout=0.1,
                  max_length=16, train_batch_size=8, eval_batch_size=8, max_steps=4, learning_rate=1e-2,
                  logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=8)
    values.update(overrides)
    return TrainingArguments(**values)


def sft(arguments: TrainingArguments, **kwargs) -> SFTTrainer:
    return SFTTrainer(arguments, SFTArguments(assistant_only_loss=True), **kwargs)


def eval_logits(model, ids: np.ndarray) -> np.ndarray:
    """Deterministic logits: adapter dropout off (the trainer leaves its module in train mode, as PyTorch does)."""
    model.eval()
    try:
        return np.asarray(model(ids))
    finally:
        model.train()


def prompt_ids(tokenizer) -> np.ndarray:
    return np.asarray([tokenizer.apply_chat_template([{"role": "user", "content": "12+30"}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"]])


def assert_holds_the_tokenizer(adapter_dir: Path, tokenizer) -> None:
    """docs/lora.md: `final_model/adapter/` holds the tokenizer, loadable on its own, encoding as the run did."""
    assert (adapter_dir / "tokenizer_config.json").is_file() and (adapter_dir / "tokenizer.json").is_file()
    loaded = transformers.AutoTokenizer.from_pretrained(adapter_dir)
    assert loaded("12+30=42")["input_ids"] == tokenizer("12+30=42")["input_ids"]
    np.testing.assert_array_equal(prompt_ids(loaded), prompt_ids(tokenizer))


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def float_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if np.issubdtype(leaf.dtype, np.floating))


def test_only_adapters_train_and_checkpoints_hold_no_base_weights(tmp_path, base_dir):
    trainer = sft(lora_args(tmp_path, base_dir, save_strategy="steps", save_steps=2))
    trainer.train()
    state = trainer.state
    names = {jax.tree_util.keystr(path, simple=True, separator=".").rsplit(".", 1)[-1]
             for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert names == {"lora_a", "lora_b"}
    # 7 projections per layer, each r * (in + out): q/o/gate/up/down see hidden or intermediate widths.
    hidden, inter, kv = 32, 64, 2 * 8
    per_layer = RANK * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 2 + (inter + hidden))
    assert lora.count_params(state.params) == 2 * per_layer
    assert float_bytes(state.opt_state) == 2 * float_bytes(state.params), "AdamW moments for the adapters only"
    loaded = from_pretrained(base_dir)
    original = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    flat_base = dict(jax.tree_util.tree_flatten_with_path(state.base)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(original)[0]:
        np.testing.assert_array_equal(np.asarray(flat_base[path]), np.asarray(value))  # bit-identical base
    assert len(flat_base) == len(jax.tree.leaves(original))
    with CheckpointManager(tmp_path / "checkpoints") as manager:
        stored = manager.stored_signature(4)
        run_info = manager.read_run_info(4)
    assert not [key for key in stored if key.endswith(("kernel", "bias", "scale", "embedding"))], "no base weights"
    assert sum(int(np.prod(shape)) for key, (shape, _) in stored.items() if key.startswith("params.")) == \
        lora.count_params(state.params)
    assert run_info["base_fingerprint"] and all(len(d) == 2 for d in run_info["base_fingerprint"].values())


def test_resume_is_exact_after_sigkill(tmp_path, base_dir):
    """A run killed (SIGKILL from inside, no cleanup) after its step-4 checkpoint, then resumed, logs the losses
    of an uninterrupted run bit for bit; adapter dropout makes the RNG streams matter. The uninterrupted run trains
    first in the resuming process (a process start costs more than its eight steps)."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from easytrain import Callback
from test_lora_trainer import lora_args, sft

class KillAfter(Callback):
    def on_save(self, trainer, step, checkpoint_dir):
        if step == int(sys.argv[2]):
            trainer.checkpoint_manager().wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)

kill_at = int(sys.argv[2])
run = lambda output_dir, resume=None: lora_args(output_dir, {str(base_dir)!r}, max_steps=8, save_strategy="steps",
                                                save_steps=2, resume_from_checkpoint=resume)
for uninterrupted in sys.argv[4:]:
    sft(run(uninterrupted)).train()
sft(run(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else None), callbacks=[KillAfter()] if kill_at else []).train()
""")
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = lambda *argv: subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True)
    killed = run(str(tmp_path / "killed"), "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(logged(tmp_path / "killed")) < 8
    resumed = run(str(tmp_path / "killed"), "0", "latest", str(tmp_path / "straight"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged(tmp_path / "killed") == logged(tmp_path / "straight")
    assert len(logged(tmp_path / "straight")) == 8


def test_resuming_over_another_base_or_other_lora_settings_fails_before_compute(tmp_path, base_dir):
    sft(lora_args(tmp_path / "run", base_dir, max_steps=2, save_strategy="steps", save_steps=2)).train()
    other = write_base(tmp_path / "other", seed=1)
    resume = dict(max_steps=4, save_strategy="steps", save_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(ArgumentError, match="base model differs") as error:
        sft(lora_args(tmp_path / "run", other, **resume)).setup()
    assert error.value.field == "model_name_or_path" and "tensor(s) differ" in str(error.value)
    with pytest.raises(ArgumentError) as error:
        sft(lora_args(tmp_path / "run", base_dir, lora_rank=8, **resume)).setup()
    assert error.value.field == "lora_rank"
    with pytest.raises(ArgumentError) as error:
        sft(lora_args(tmp_path / "run", base_dir, lora_rank=0, lora_dropout=0.0, **resume)).setup()
    assert error.value.field == "lora_rank"
    with pytest.raises(ArgumentError, match="trained with scan_layers=False") as error:
        sft(lora_args(tmp_path / "run", base_dir, scan_layers=True, **resume)).setup()
    assert error.value.field == "scan_layers"
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]


@pytest.mark.parametrize("overrides, field", [
    (dict(lora_target_modules=["qq_proj"]), "lora_target_modules"),
    (dict(lora_target_modules=["re:model\\.layers\\.9\\..*"]), "lora_target_modules"),
    (dict(lora_target_modules=["embed_tokens"]), "lora_target_modules"),
])
def test_targets_that_match_nothing_fail_naming_the_argument(tmp_path, base_dir, overrides, field):
    with pytest.raises(ArgumentError) as error:
        sft(lora_args(tmp_path, base_dir, **overrides)).setup()
    assert error.value.field == field


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "stacked layers"])
def test_exports_a_merged_model_and_a_peft_adapter_with_the_adapted_logits(tmp_path, base_dir, scan_layers):
    """With scan_layers the adapters train stacked with their layers; both exports are still per layer."""
    peft = pytest.importorskip("peft")
    import torch

    trainer = sft(lora_args(tmp_path, base_dir, save_pretrained_at_end=True, max_steps=6, scan_layers=scan_layers))
    trainer.train()
    assert trainer.model.scan_layers == scan_layers
    export = tmp_path / "final_model"
    ids = prompt_ids(trainer.tokenizer)
    ours = eval_logits(trainer.model, ids)
    merged = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert np.abs(torch_logits(merged, ids) - ours).max() < 1e-4
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    untrained = torch_logits(base, ids)
    assert np.abs(untrained - ours).max() > 1e-3, "the adapters were trained"
    adapted = peft.PeftModel.from_pretrained(base, export / "adapter").eval()
    assert np.abs(torch_logits(adapted, ids) - ours).max() < 1e-4
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["base_model_name_or_path"] == str(base_dir)
    assert_holds_the_tokenizer(export / "adapter", trainer.tokenizer)  # lora_export="both"


def test_a_peft_adapter_made_elsewhere_continues_training(tmp_path, base_dir):
    model = lora.apply_lora(from_pretrained(base_dir), lora.LoRAConfig(rank=RANK, alpha=8), rngs=nnx.Rngs(3))
    for module in lora.lora_modules(model).values():  # an adapter that is not the identity
        module.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(1), module.lora_b.shape)
    adapter = save_peft_adapter(tmp_path / "adapter", model, lora.LoRAConfig(rank=RANK, alpha=8))
    trainer = sft(lora_args(tmp_path / "run", base_dir, lora_rank=0, lora_dropout=0.0,  # the adapter's
                            lora_adapter_path=str(adapter)))
    trainer.setup()
    ids = prompt_ids(trainer.tokenizer)
    np.testing.assert_allclose(eval_logits(trainer.model, ids), np.asarray(model(ids)), atol=1e-5)
    assert trainer.lora.alpha == 8 and trainer.evaluate()["eval_loss"] > 0
    trainer.train()
    assert np.abs(eval_logits(trainer.model, ids) - np.asarray(model(ids))).max() > 1e-3
    with pytest.raises(ArgumentError) as error:
        sft(lora_args(tmp_path / "bad", base_dir, lora_rank=8, lora_adapter_path=str(adapter)))
    assert error.value.field == "lora_rank"


def dpo_args(output_dir, base, **overrides) -> TrainingArguments:
    return lora_args(output_dir, base, lora_dropout=0.0, max_length=16, max_train_samples=32, **overrides)


def test_dpo_reference_is_the_base_with_adapters_off(tmp_path, base_dir):
    """No reference copy in the state, and the same losses as a reference computed by a separate base model
    (precomputed log-probs): an adapter-off pass that kept the adapters would give rewards of 0 and differ."""
    trainer = DPOTrainer(dpo_args(tmp_path / "off", base_dir))
    assert trainer.state.frozen == {} and trainer.reference_is_base
    trainer.train()
    precomputed = DPOTrainer(dpo_args(tmp_path / "pre", base_dir), DPOArguments(precompute_ref_log_probs=True))
    precomputed.train()
    off, pre = logged(tmp_path / "off"), logged(tmp_path / "pre")
    assert off.keys() == pre.keys() and len(off) == 4
    np.testing.assert_allclose(list(off.values()), list(pre.values()), rtol=1e-5)
    margins = logged(tmp_path / "off", "rewards/margins")
    assert abs(margins[4]) > 1e-4, "the policy moved away from the reference"
    with pytest.raises(ArgumentError) as error:
        DPOTrainer(dpo_args(tmp_path / "bad", base_dir, lora_train_embeddings=True))
    assert error.value.field == "lora_train_embeddings"
    with pytest.raises(ArgumentError) as error:
        DPOTrainer(dpo_args(tmp_path / "bad2", base_dir), DPOArguments(sync_ref_model=True))
    assert error.value.field == "sync_ref_model"


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_the_cli_trains_lora(tmp_path, base_dir, task):
    code = main(["train", "--task", task, "--lora_rank", "8", "--model_name_or_path", str(base_dir),
                 "--output_dir", str(tmp_path), "--max_steps", "2", "--max_length", "16", "--train_batch_size", "8",
                 "--eval_batch_size", "8", "--max_train_samples", "32", "--max_eval_samples", "8",
                 "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "jsonl",
                 "--disable_progress_bar", "--lora_export", "adapter", "--logging_steps", "1"])
    assert code == 0
    config = json.loads((tmp_path / "final_model" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and not (tmp_path / "final_model" / "config.json").exists()
    run_tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)  # the run's: the base's own
    assert_holds_the_tokenizer(tmp_path / "final_model" / "adapter", run_tokenizer)  # lora_export="adapter"
    assert len(logged(tmp_path)) == 2


def test_an_adapter_on_a_random_base_is_refused_before_any_weight_is_drawn(tmp_path, base_dir, monkeypatch):
    """`lora_adapter_path` needs the base the adapter was trained on: without `model_name_or_path` it is refused,
    naming the argument, before the fresh model's initialisation runs."""
    model = lora.apply_lora(from_pretrained(base_dir), lora.LoRAConfig(rank=RANK), rngs=nnx.Rngs(3))
    adapter = save_peft_adapter(tmp_path / "adapter", model, lora.LoRAConfig(rank=RANK))
    runs, real = [], placement.initialise_module
    monkeypatch.setattr(placement, "initialise_module", lambda *a, **k: runs.append(1) or real(*a, **k))
    arguments = lora_args(tmp_path / "run", "", model_name_or_path=None, tokenizer_name=str(base_dir), lora_rank=0,
                          lora_dropout=0.0, lora_adapter_path=str(adapter))
    with pytest.raises(ArgumentError, match="needs pretrained base weights") as error:
        sft(arguments).setup()
    assert error.value.field == "lora_adapter_path" and not runs
