"""Train a small Llama from scratch on a local text file.

    python examples/train_from_text_file.py --text_file my_corpus.txt --output_dir runs/text

It first trains a byte-level BPE tokenizer on the file (no downloads), then trains the model with
`BaseTrainer`, evaluates it on a held-out split and exports it in Hugging Face format. With no
--text_file it writes a small demo corpus so the example runs anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from easytrain import BaseTrainer, TrainingArguments

DEMO = "The cat sat on the mat. The dog sat on the log. A bird sang on a branch. " * 200


def train_tokenizer(text_file: Path, vocab_size: int, directory: Path) -> str:
    """A byte-level BPE tokenizer fitted to the file, saved where `AutoTokenizer` can load it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(text_file)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return str(directory)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_file", type=Path, default=None)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/text_file"))
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--vocab_size", type=int, default=512)
    options = parser.parse_args(argv)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    text_file = options.text_file
    if text_file is None:
        text_file = options.output_dir / "demo.txt"
        text_file.write_text("\n".join(DEMO.split(". ")))
    arguments = TrainingArguments(
        output_dir=str(options.output_dir), train_file=str(text_file),
        tokenizer_name=train_tokenizer(text_file, options.vocab_size, options.output_dir / "tokenizer"),
        max_length=64, train_batch_size=8, eval_batch_size=8, max_steps=options.max_steps, learning_rate=1e-3,
        warmup_steps=10, validation_split_percentage=10, eval_strategy="no", save_steps=100,
        overwrite_output_dir=True)
    trainer = BaseTrainer(arguments)
    trainer.train()
    metrics = trainer.evaluate()
    print(f"eval loss {metrics['eval_loss']:.3f}, perplexity {metrics['eval_perplexity']:.1f}; "
          f"model exported to {options.output_dir / 'final_model'}")
    return metrics


if __name__ == "__main__":
    main()
