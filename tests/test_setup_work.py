"""The work a trainer's set-up and first steps do: each program traced once, not again for a question its first
trace already answered."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import BaseTrainer, LossOutput, TrainingArguments


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


class Tiny(nnx.Module):
    """A module that is not a language model: a sharded linear layer and BatchNorm statistics."""

    def __init__(self, rngs: nnx.Rngs):
        kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        self.linear = nnx.Linear(4, 2, kernel_init=kernel_init, rngs=rngs)
        self.norm = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


class BuildCounting:
    """Counts the builds of its module (`create_module`, traced or run) and the traces of its optimizer's init."""

    builds = tx_inits = 0

    def create_module(self):
        type(self).builds += 1
        return super().create_module()

    def configure_optimizer(self, schedule):
        tx = super().configure_optimizer(schedule)

        def init(params):
            type(self).tx_inits += 1
            return tx.init(params)

        return tx._replace(init=init)


class CountingLanguageModel(BuildCounting, BaseTrainer):
    pass


class CountingClassifier(BuildCounting, BaseTrainer):
    def prepare_datasets(self):
        rows = lambda seed: {"x": np.random.default_rng(seed).normal(size=(16, 4)).astype(np.float32)}
        return rows(0), rows(1)

    def collate(self, rows, example_ids):
        return {"x": rows["x"], "weight": (example_ids >= 0).astype(np.float32)}

    def create_module(self):
        type(self).builds += 1
        return Tiny(nnx.Rngs(self.arguments.seed))

    def compute_loss(self, model, batch, rng, train, frozen):
        return LossOutput(jnp.sum(model(batch["x"]).sum(-1) ** 2 * batch["weight"]), jnp.sum(batch["weight"]), {})


@pytest.mark.parametrize("trainer_class, overrides", [
    (CountingLanguageModel, {}), (CountingLanguageModel, {"scan_layers": True}),
    (CountingClassifier, {"max_train_samples": None, "max_eval_samples": None})],
    ids=["language_model", "scan_layers", "custom_module"])
def test_a_fresh_setup_builds_its_module_twice_and_traces_its_optimizer_init_once(tmp_path, trainer_class, overrides):
    """A fresh run builds its module once shape-only (what `adapt_module` refuses, before any weight is drawn) and
    once inside the program that initialises it, whose shardings come from that same trace; the optimizer state's
    program traces `tx.init` once, its moments' shardings following from the shapes of that trace."""
    trainer_class.builds = trainer_class.tx_inits = 0
    trainer = trainer_class(small_args(tmp_path, **overrides))
    trainer.setup()
    assert (trainer_class.builds, trainer_class.tx_inits) == (2, 1)
    trainer.train()
    assert (trainer_class.builds, trainer_class.tx_inits) == (2, 1)
