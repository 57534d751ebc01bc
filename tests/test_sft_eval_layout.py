"""The same model gives the same eval_loss whatever the batch layout: padded rows, whole examples packed (bfd), or
`packing_strategy='wrapped'`, which wraps the training data only (wrapping eval examples would cut them, and the
cut pieces lose the context before the cut)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
from chat_fixtures import build_chat_tokenizer

from easytrain import TrainingArguments
from easytrain.trainers.sft import SFTArguments, SFTTrainer

WORDS = "the quick brown fox jumps over lazy dog two plus is four".split()


def conversations(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        messages = []
        for _ in range(int(rng.integers(1, 3))):
            messages += [{"role": "user", "content": " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))},
                         {"role": "assistant", "content": " ".join(rng.choice(WORDS, int(rng.integers(1, 8))))}]
        rows.append({"messages": messages})
    return rows


def test_eval_loss_is_the_same_padded_packed_and_wrapped(tmp_path):
    tok = build_chat_tokenizer("llama3_base")
    rows = conversations(40)
    train, validation = datasets.Dataset.from_list(rows[:24]), datasets.Dataset.from_list(rows[24:])
    losses, eval_stats = {}, {}
    for label, sft in [("padded", {}), ("bfd", {"packing": True}),
                       ("wrapped", {"packing": True, "packing_strategy": "wrapped"})]:
        args = TrainingArguments(output_dir=str(tmp_path / label), max_length=48, train_batch_size=2,
                                 eval_batch_size=2, max_steps=1, eval_strategy="no", save_strategy="no",
                                 report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False, seed=0)
        trainer = SFTTrainer(args, SFTArguments(assistant_only_loss=True, **sft), tokenizer=tok,
                             dataset_train=train, dataset_eval=validation)
        losses[label] = float(trainer.evaluate()["eval_loss"])
        eval_stats[label] = trainer.data_stats["validation"]
    assert eval_stats["wrapped"] == eval_stats["bfd"], "the eval examples are packed whole, as for bfd"
    np.testing.assert_allclose(losses["bfd"], losses["padded"], rtol=1e-5)
    np.testing.assert_allclose(losses["wrapped"], losses["padded"], rtol=1e-5, err_msg=str(losses))
