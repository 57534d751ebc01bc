"""The trainer contract, checked by behaviour for every trainer in the package and the examples."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from easytrain import (BaseTrainer, ConfiguredDataloaders, ConfiguredFunctions, ConfiguredModel,
                       TrainingArguments, TrainState)
from easytrain.cli import run
from easytrain.protocol import missing_members
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.sft import SFTArguments, SFTTrainer
from runs import StopAt, logged

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # so `--task image_classifier:...` imports it like a user's module
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def image_trainer():
    module = load_example("image_classifier")
    module.ImageClassifierTrainer.train_size, module.ImageClassifierTrainer.eval_size = 256, 40
    return module.ImageClassifierTrainer, "image_classifier:ImageClassifierTrainer"


def packed_sft(arguments, **kwargs):
    return SFTTrainer(arguments, SFTArguments(packing=True, assistant_only_loss=True), **kwargs)


TEXT = dict(max_length=32, max_train_samples=64, max_eval_samples=20)
LORA = dict(lora_rank=4, lora_dropout=0.1, lora_train_norms=True)  # adapters, a fully trained extra, RNG streams
#: name -> (trainer factory, --task value, extra arguments)
TRAINERS = {
    "BaseTrainer": lambda: (BaseTrainer, "lm", TEXT),
    "ImageClassifierTrainer": lambda: (*image_trainer(), {}),
    "SFTTrainer": lambda: (SFTTrainer, "sft", {**TEXT, "max_eval_samples": 8}),
    "SFTTrainer, packed": lambda: (packed_sft, "sft", {**TEXT, "max_eval_samples": 8}),
    "DPOTrainer": lambda: (DPOTrainer, "dpo", dict(max_length=16, max_train_samples=32, max_eval_samples=8)),
    "SFTTrainer, LoRA": lambda: (SFTTrainer, "sft", {**TEXT, "max_eval_samples": 8, **LORA}),
    "DPOTrainer, LoRA": lambda: (DPOTrainer, "dpo", dict(max_length=16, max_train_samples=32, max_eval_samples=8,
                                                         lora_rank=4)),
}


def arguments(tmp_path, task, extra, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), task=task, train_batch_size=8, eval_batch_size=8, max_steps=4,
                  logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, **extra)
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture(params=sorted(TRAINERS))
def trainer_kind(request):
    return TRAINERS[request.param]()


def test_configure_hooks_return_working_named_tuples(tmp_path, trainer_kind):
    cls, task, extra = trainer_kind
    trainer = cls(arguments(tmp_path, task, extra))
    assert missing_members(trainer) == []
    data = trainer.dataloaders
    assert isinstance(data, ConfiguredDataloaders) and data.total_steps == 4 and data.steps_per_epoch > 0
    host_batch = next(data.train.iterator(0))
    assert all(len(value) == 8 for value in host_batch.values()), "rows of one global batch"
    eval_batches = list(data.eval)
    assert eval_batches and list(data.eval).__len__() == len(eval_batches), "eval is re-iterable"
    configured = trainer._model
    assert isinstance(configured, ConfiguredModel) and isinstance(configured.model, nnx.Module)
    assert isinstance(configured.state, TrainState) and configured.mesh is trainer.mesh
    functions = trainer.functions
    assert isinstance(functions, ConfiguredFunctions)
    metrics = functions.eval_step(trainer.state, trainer.to_global(eval_batches[0]))
    assert np.isfinite(metrics["loss"].result())
    state, step_metrics = functions.train_step(trainer.state, trainer.to_global(host_batch))
    assert int(state.step) == 1 and np.isfinite(step_metrics["loss"].result())


def test_train_returns_logs_and_evaluate_ignores_the_eval_batch_size(tmp_path, trainer_kind):
    cls, task, extra = trainer_kind
    trainer = cls(arguments(tmp_path / "train", task, extra))  # eval_batch_size 8
    at_eight = trainer.evaluate()
    logs = trainer.train()
    assert np.isfinite(logs["loss"]) and logs["skipped_steps"] == 0
    results = [cls(arguments(tmp_path / "3", task, extra, eval_batch_size=3)).evaluate(), at_eight]
    assert results[0].keys() == results[1].keys() and "eval_loss" in results[0]
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=1e-5), key


def test_a_checkpoint_resumes_exactly(tmp_path, trainer_kind):
    cls, task, extra = trainer_kind
    common = dict(save_strategy="steps", save_steps=2)
    straight = arguments(tmp_path / "straight", task, extra, **common)
    cls(straight).train()
    interrupted = arguments(tmp_path / "interrupted", task, extra, **common)
    cls(interrupted, callbacks=[StopAt(2)]).train()
    cls(arguments(tmp_path / "interrupted", task, extra, resume_from_checkpoint="latest", **common)).train()
    assert logged(interrupted.output_dir) == logged(straight.output_dir)


def test_the_cli_drives_it(tmp_path, trainer_kind):
    cls, task, extra = trainer_kind
    summary = run(arguments(tmp_path, task, extra, max_steps=2))
    assert np.isfinite(summary["train_loss"]) and "eval_loss" in summary
    assert json.loads((tmp_path / "results.json").read_text()) == summary
    assert jax.tree.leaves(summary)
