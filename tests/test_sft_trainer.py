"""SFTTrainer end to end: masks in real batches, the CLI, bucketed compilations, pretrained in and out,
resume checks, and the example that learns."""

import functools
import json
import logging
from pathlib import Path

import datasets
import jax
import numpy as np
import pytest
import torch
import transformers

from easytrain import ArgumentError, TrainingArguments
from easytrain.cli import main
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
from easytrain.trainers.sft import SFTArguments, SFTTrainer
from runs import StopAt, long_training_options
from script_modules import load_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=16, train_batch_size=8, eval_batch_size=8,
                  max_steps=4, learning_rate=3e-3, logging_steps=1, eval_strategy="no", save_strategy="no",
                  report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                  max_train_samples=64, max_eval_samples=16)
    values.update(overrides)
    return TrainingArguments(**values)


def supervised_texts(trainer, batch) -> list[str]:
    """Each row's supervised targets, decoded per segment (one per example)."""
    texts = []
    segments = batch.get("segment_ids", np.ones_like(batch["targets"]))
    for targets, mask, segment in zip(batch["targets"], batch["loss_mask"], segments):
        for seg in sorted(set(segment[mask > 0].tolist())):
            keep = (mask > 0) & (segment == seg)
            texts.append(trainer.tokenizer.decode(targets[keep].tolist()))
    return texts


@pytest.mark.parametrize("packing", [False, True])
def test_batches_supervise_exactly_the_answers_and_their_end_of_turn(tmp_path, packing):
    trainer = SFTTrainer(tiny_args(tmp_path, max_length=32), SFTArguments(assistant_only_loss=True, packing=packing))
    batch = next(trainer.dataloaders.train.iterator(0))
    texts = supervised_texts(trainer, batch)
    assert len(texts) >= 8 and all(text.endswith("<|end|>") for text in texts), texts
    assert all(text[: -len("<|end|>")].lstrip("-").isdigit() for text in texts), texts
    if packing:
        assert batch["segment_ids"].max() > 1, "several conversations share a row"
        assert trainer.data_stats["train"]["packing_fill_rate"] > 0.5


def test_the_cli_runs_sft_with_its_own_options(tmp_path, capsys):
    assert main(["train", "--task", "sft", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--packing" in help_text and "generation markers" in help_text
    (tmp_path / "sft_data_stats.json").write_text('{"train": "an older run\'s"}')  # alone: no run to refuse for
    status = main(["train", "--task", "sft", "--output_dir", str(tmp_path), "--max_steps", "2", "--max_length", "32",
                   "--train_batch_size", "8", "--max_train_samples", "64", "--max_eval_samples", "8",
                   "--packing", "--assistant_only_loss", "--generation_eval_samples", "4", "--max_new_tokens", "4",
                   "--report_to", "none", "--disable_progress_bar", "--no_save_pretrained_at_end"])
    assert status == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert np.isfinite(summary["train_loss"]) and 0 <= summary["eval_exact_match"] <= 1
    stats = json.loads((tmp_path / "sft_data_stats.json").read_text())
    assert stats["train"]["num_kept"] == 64 and "packing_fill_rate" in stats["train"]
    assert not (tmp_path / "replaced_run").exists(), "the older stats, held until the first step, are gone"


def test_padding_compiles_once_per_bucket_at_most(tmp_path, caplog):
    rng = np.random.default_rng(0)
    prompt_lengths = np.where(rng.random(96) < 0.05, 45, rng.integers(1, 8, 96))  # skewed: a few long ones
    completion_lengths = rng.integers(1, 6, 96)
    rows = [{"prompt": "1" * int(n), "completion": "2" * int(m)} for n, m in zip(prompt_lengths, completion_lengths)]
    args = tiny_args(tmp_path, max_length=64, max_steps=-1, num_train_epochs=2, max_train_samples=None,
                     validation_split_percentage=0, eval_strategy="no")
    trainer = SFTTrainer(args, dataset_train=datasets.Dataset.from_list(rows),
                         tokenizer=build_arithmetic_chat_tokenizer())
    trainer.setup()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records]
    compiled = [m for m in messages if "Compiling" in m and "train_step" in m]
    assert 1 < len(compiled) <= len(trainer._pad.buckets), compiled


def test_resume_under_different_packing_is_refused_before_compute(tmp_path):
    args = tiny_args(tmp_path, save_strategy="steps", save_steps=2)
    SFTTrainer(args, SFTArguments(packing=False), callbacks=[StopAt(2)]).train()
    with pytest.raises(ArgumentError, match="packing: checkpoint False vs now True"):
        SFTTrainer(tiny_args(tmp_path, save_strategy="steps", save_steps=2, resume_from_checkpoint="latest"),
                   SFTArguments(packing=True)).setup()


def test_fine_tunes_a_local_hugging_face_model_and_exports_the_same_logits(tmp_path):
    tokenizer = build_arithmetic_chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    args = tiny_args(tmp_path, model_name_or_path=str(tmp_path / "base"), save_pretrained_at_end=True,
                     learning_rate=1e-2)
    trainer = SFTTrainer(args, SFTArguments(assistant_only_loss=True))
    trainer.train()
    export = Path(args.output_dir) / "final_model"
    ids_BT = np.asarray([tokenizer.apply_chat_template([{"role": "user", "content": "12+30"}],
                                                       add_generation_prompt=True, tokenize=True, return_dict=True)
                         ["input_ids"]])
    ours = np.asarray(trainer.model(ids_BT))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reloaded(torch.tensor(ids_BT)).logits.numpy()
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        untrained = base(torch.tensor(ids_BT)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(untrained - theirs).max() > 1e-3, "the export holds the fine-tuned weights"
    assert transformers.AutoTokenizer.from_pretrained(export).chat_template == tokenizer.chat_template


def test_the_example_learns(tmp_path, monkeypatch):
    module = load_script("sft_arithmetic", EXAMPLES / "sft_arithmetic.py")
    # 100 steps: its steps compiled at -O1 run in less than half the time they take at the suite's -O0
    monkeypatch.setattr(module, "TrainingArguments",
                        functools.partial(TrainingArguments, compiler_options=long_training_options()))
    result = module.main(["--output_dir", str(tmp_path), "--max_steps", "100", "--eval_samples", "16",
                          "--train_batch_size", "8"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["split"] == "train"]
    assert losses[-1] < losses[0] - 0.2 and losses[0] < np.log(21) - 0.5, losses  # 21 tokens: ln 21 at random
    assert result["eval_accuracy"] > 0.35 and 0 <= result["eval_exact_match"] <= 1


def test_chat_data_from_a_local_jsonl_file_with_user_metrics_on_generated_answers(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "0"}, {"role": "user", "content": f"{i}+1"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(40)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    seen = {}

    def compute_metrics(predictions, references):
        seen["references"] = references
        return {"answered": float(np.mean([bool(p) for p in predictions]))}

    args = tiny_args(tmp_path, train_file=str(path), validation_split_percentage=20, max_train_samples=None)
    trainer = SFTTrainer(args, SFTArguments(assistant_only_loss=True, generation_eval_samples=4, max_new_tokens=3),
                         tokenizer=build_arithmetic_chat_tokenizer(), compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_answered"] <= 1 and 0 <= metrics["eval_exact_match"] <= 1
    assert len(seen["references"]) == 4 and all(r.isdigit() for r in seen["references"])
    assert trainer.data_stats["train"]["num_kept"] == 32


def test_a_formatting_func_also_shapes_the_generation_prompts(tmp_path):
    rows = datasets.Dataset.from_list([{"question": f"{i}+1", "answer": str(i + 1)} for i in range(40)])

    def to_chat(example):
        return {"messages": [{"role": "user", "content": example["question"]},
                             {"role": "assistant", "content": example["answer"]}]}

    trainer = SFTTrainer(tiny_args(tmp_path, max_length=32, validation_split_percentage=20, max_train_samples=None),
                         SFTArguments(generation_eval_samples=4, max_new_tokens=3),
                         tokenizer=build_arithmetic_chat_tokenizer(), dataset_train=rows, formatting_func=to_chat)
    assert 0 <= trainer.evaluate()["eval_exact_match"] <= 1


class Records(logging.Handler):
    """The `easytrain` logger's records, whether or not it propagates (the CLI turns propagation off)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))

    def __enter__(self):
        self.logger = logging.getLogger("easytrain")
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def test_examples_dropped_for_length_are_warned_about(tmp_path):
    short = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
    long = {"messages": [{"role": "user", "content": "1" * 60 + "+1"}, {"role": "assistant", "content": "2"}]}
    args = tiny_args(tmp_path, max_length=32, validation_split_percentage=0, max_train_samples=None)
    trainer = SFTTrainer(args, SFTArguments(truncation_side="drop"), tokenizer=build_arithmetic_chat_tokenizer(),
                         dataset_train=datasets.Dataset.from_list([short] * 20 + [long] * 5))
    with Records() as records:
        trainer.prepare_datasets()
    assert trainer.data_stats["train"]["dropped_too_long"] == 5
    warnings = [message for level, message in records.lines if level == logging.WARNING and "SFT train" in message]
    assert len(warnings) == 1 and "5 dropped as too long" in warnings[0], records.lines


def test_an_example_longer_than_max_length_fills_all_its_positions(tmp_path):
    """max_length counts positions: a long example keeps max_length + 1 tokens, max_length (input, target) pairs
    (TRL's max_length N is `--max_length N-1`, docs/porting.md). Checked on the batch, without a model."""
    rows = datasets.Dataset.from_list([{"text": "1+2=3 " * 20}] * 8)
    trainer = SFTTrainer(tiny_args(tmp_path, max_length=8, validation_split_percentage=0),
                         tokenizer=build_arithmetic_chat_tokenizer(), dataset_train=rows)
    train, _ = trainer.prepare_datasets()
    assert set(train["length"]) == {9}
    batch = trainer.collate(train[:2], np.arange(2))
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].all() and batch["loss_mask"].all()


def test_data_stats_log_counts_as_integers(tmp_path):
    trainer = SFTTrainer(tiny_args(tmp_path))
    trainer.data_stats = {"train": {"num_examples": 123456, "num_kept": 123450, "truncated": 0,
                                    "packing_fill_rate": 0.867213}}
    with Records() as records:
        trainer._report_data_stats()
    assert ("SFT train data: num_examples=123456, num_kept=123450, truncated=0, packing_fill_rate=0.8672"
            in [message for _, message in records.lines]), records.lines
