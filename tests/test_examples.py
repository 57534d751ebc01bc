"""Every example runs, at tiny size."""

from pathlib import Path

import pytest

from script_modules import load_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    return load_script(name, EXAMPLES / f"{name}.py")


def test_train_from_text_file(tmp_path):
    metrics = load("train_from_text_file").main(["--output_dir", str(tmp_path), "--max_steps", "4",
                                                 "--vocab_size", "300"])
    assert metrics["eval_loss"] > 0
    assert (tmp_path / "final_model" / "model.safetensors").is_file()


def test_custom_loss(tmp_path):
    logs = load("custom_loss").main(["--output_dir", str(tmp_path), "--max_steps", "3"])
    assert logs["z_loss"] > 0 and logs["loss"] > 0


def test_finetune_hf_model(tmp_path):
    result = load("finetune_hf_model").main(["--output_dir", str(tmp_path), "--max_steps", "3",
                                             "--max_shard_size", "100KB"])
    assert result["loss"] > 0 and result["max_logit_difference"] <= 1e-4
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()


def test_lora_sft_trains_adapters_that_peft_applies_with_the_same_logits(tmp_path):
    result = load("lora_sft").main(["--output_dir", str(tmp_path), "--max_steps", "30"])
    assert result["peft_max_logit_difference"] <= 1e-4
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.1, result
    assert 0 < result["trained_parameters"] < result["frozen_base_parameters"] / 4
    assert (tmp_path / "run" / "final_model" / "adapter" / "adapter_model.safetensors").is_file()


def test_image_classifier_learns_far_above_chance(tmp_path):
    result = load("image_classifier").main(["--output_dir", str(tmp_path), "--max_steps", "150",
                                            "--train_size", "1024"])
    assert result["eval_accuracy"] > 0.6, result  # four classes: chance is 0.25
    assert (tmp_path / "final_model" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["train_from_text_file", "custom_loss", "finetune_hf_model", "image_classifier",
                                  "sft_arithmetic", "dpo_arithmetic", "lora_sft", "reinforce"])
def test_examples_document_how_to_run_them(name):
    assert f"python examples/{name}.py" in (EXAMPLES / f"{name}.py").read_text()


def test_no_example_spells_no_warmup_as_the_default_warmup_steps():
    """`warmup_steps=0` is the default (unset: `warmup_ratio`, 0.05, decides), so an example passing it to mean "no
    warmup" still warms up: its first update runs at learning rate 0 and its curve depends on max_steps."""
    import ast

    spelled = [f"{path.name}:{node.lineno}" for path in sorted(EXAMPLES.glob("*.py"))
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.keyword) and node.arg == "warmup_steps"
               and isinstance(node.value, ast.Constant) and node.value.value == 0]
    assert not spelled, f"use warmup_ratio=0.0 for no warmup: {spelled}"
