"""Fine-tune a Hugging Face Llama with easytrain, export it, and check transformers agrees.

    python examples/finetune_hf_model.py --model_dir path/to/llama --output_dir runs/finetune
    python examples/finetune_hf_model.py --max_steps 5        # no model: builds a tiny one offline

The model (config.json + safetensors + tokenizer, e.g. from `huggingface-cli download`) is loaded
by `BaseTrainer` (`model_name_or_path`) and placed on the device mesh, fine-tuned on a text file, exported
with `easytrain.models.save_pretrained` (sharded safetensors + index above `--max_shard_size`) and
reloaded with `transformers.AutoModelForCausalLM`, whose logits must match easytrain's. Without
--model_dir it writes a tiny random Llama with transformers/PyTorch and a BPE tokenizer trained on
the demo text, so it runs with no network. Expect a max |logit difference| around 1e-6.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from easytrain import BaseTrainer, TrainingArguments
from easytrain.models import save_pretrained

DEMO = "The cat sat on the mat. The dog sat on the log. A bird sang on a branch. " * 100


def tiny_hf_model(directory: Path, text_file: Path) -> Path:
    """A random 2-layer Llama and a BPE tokenizer fitted to the text, saved as transformers would."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train([str(text_file)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def max_logit_difference(trainer: BaseTrainer, export_dir: Path, text: str) -> float:
    """Largest |easytrain - transformers| logit on `text`, the export reloaded by transformers."""
    ids_BT = np.asarray([trainer.tokenizer(text)["input_ids"][:32]])
    ours_BTV = np.asarray(trainer.model(ids_BT))
    reference = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs_BTV = reference(torch.tensor(ids_BT)).logits.numpy()
    return float(np.abs(ours_BTV - theirs_BTV).max())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=None, help="Local Hugging Face model directory.")
    parser.add_argument("--text_file", type=Path, default=None, help="Training text; default: a demo corpus.")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/finetune_hf"))
    parser.add_argument("--max_steps", type=int, default=50)
    parser.add_argument("--max_shard_size", default="5GB", help="Split the export above this size, e.g. 200MB.")
    options = parser.parse_args(argv)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    text_file = options.text_file
    if text_file is None:
        text_file = options.output_dir / "demo.txt"
        text_file.write_text("\n".join(DEMO.split(". ")))
    model_dir = options.model_dir or tiny_hf_model(options.output_dir / "base_model", text_file)
    arguments = TrainingArguments(
        output_dir=str(options.output_dir / "run"), model_name_or_path=str(model_dir), train_file=str(text_file),
        max_length=64, train_batch_size=8, eval_batch_size=8, max_steps=options.max_steps, learning_rate=1e-3,
        warmup_ratio=0.0, eval_strategy="no", save_strategy="no", save_pretrained_at_end=False,
        report_to=["none"], disable_progress_bar=True, overwrite_output_dir=True)
    trainer = BaseTrainer(arguments)
    logs = trainer.train()
    export_dir = save_pretrained(options.output_dir / "export", trainer.model, trainer.model_config,
                                 tokenizer=trainer.tokenizer, max_shard_size=options.max_shard_size)
    difference = max_logit_difference(trainer, export_dir, text_file.read_text()[:400])
    print(f"loss {logs['loss']:.3f} after {options.max_steps} steps; exported to {export_dir}; "
          f"transformers reloads it with max |logit difference| {difference:.2e}")
    return {"loss": logs["loss"], "max_logit_difference": difference}


if __name__ == "__main__":
    main()
