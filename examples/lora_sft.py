"""LoRA-fine-tune a local Hugging Face model with SFT, export a PEFT adapter, and check it in PEFT.

    python examples/lora_sft.py --model_dir path/to/llama --output_dir runs/lora_sft
    python examples/lora_sft.py --max_steps 20          # no model: builds a tiny one offline

The base model (config.json + safetensors + a tokenizer with a chat template, e.g. from
`huggingface-cli download`) is loaded onto the device mesh by `SFTTrainer` (`model_name_or_path`); rank
`--lora_rank` adapters on every attention and MLP projection train on the embedded arithmetic
conversations (only the answers are supervised); the base weights never change and get no optimizer
state. At the end the trainer writes the PEFT adapter (`lora_export="adapter"`) to
`<output_dir>/run/final_model/adapter`, which this script loads the PyTorch way,
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)`, and
compares with easytrain's logits. Without --model_dir it writes a tiny random Llama with the arithmetic
chat tokenizer, so it runs with no network. Expect a max |logit difference| around 1e-6 and a lower
eval loss after training than before. Needs `torch` and `peft` (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from easytrain import TrainingArguments
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
from easytrain.trainers.sft import SFTArguments, SFTTrainer


def tiny_hf_model(directory: Path) -> Path:
    """A random 2-layer Llama with the arithmetic chat tokenizer, saved as transformers would."""
    tokenizer = build_arithmetic_chat_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def peft_logit_difference(trainer: SFTTrainer, model_dir: Path, adapter_dir: Path) -> float:
    """Largest |easytrain - PEFT| logit on one chat prompt, the adapter applied by PEFT to the PyTorch base."""
    import peft

    messages = [{"role": "user", "content": "12+30"}]
    ids_BT = np.asarray([trainer.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                               return_dict=True)["input_ids"]])
    model = trainer.model
    model.eval()  # adapter dropout off, as PEFT's model.eval()
    ours_BTV = np.asarray(model(ids_BT))
    model.train()
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        theirs_BTV = adapted(torch.tensor(ids_BT)).logits.numpy()
    return float(np.abs(ours_BTV - theirs_BTV).max())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=None, help="Local Hugging Face model directory.")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/lora_sft"))
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    options = parser.parse_args(argv)
    model_dir = options.model_dir or tiny_hf_model(options.output_dir / "base_model")
    arguments = TrainingArguments(
        output_dir=str(options.output_dir / "run"), model_name_or_path=str(model_dir), lora_rank=options.lora_rank,
        lora_alpha=2 * options.lora_rank, lora_dropout=0.05, lora_export="adapter", max_length=48,
        train_batch_size=16, eval_batch_size=16, max_steps=options.max_steps, learning_rate=options.learning_rate,
        warmup_ratio=0.0, logging_steps=max(1, options.max_steps // 10), eval_strategy="no", save_strategy="no",
        max_eval_samples=64, report_to=["jsonl"], disable_progress_bar=True, overwrite_output_dir=True)
    trainer = SFTTrainer(arguments, SFTArguments(assistant_only_loss=True))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    adapter_dir = Path(arguments.output_dir) / "final_model" / "adapter"
    difference = peft_logit_difference(trainer, model_dir, adapter_dir)
    trained = sum(leaf.size for leaf in jax.tree.leaves(trainer.state.params))
    frozen = sum(leaf.size for leaf in jax.tree.leaves(trainer.state.base))
    result = {"eval_loss_before": before, "eval_loss_after": after, "trained_parameters": int(trained),
              "frozen_base_parameters": int(frozen), "peft_max_logit_difference": difference}
    print(json.dumps(result))
    print(f"eval loss {before:.3f} -> {after:.3f} training {trained} adapter parameters ({frozen} frozen); "
          f"PEFT applies {adapter_dir} to the PyTorch base with max |logit difference| {difference:.2e}")
    return result


if __name__ == "__main__":
    main()
