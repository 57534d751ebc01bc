"""SFT's evaluation by generation must stay within the model's positions, checked before any compute.

A prompt of P tokens and `max_new_tokens` N feed the model P + N - 1 tokens; positions past
`max_position_embeddings` were never trained (RoPE extrapolates silently), so the scores would measure something the
model cannot do. As `max_length` past `max_position_embeddings` is refused, so is a generation that would run past it.
"""

import types

import datasets
import pytest

from easytrain import TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
from easytrain.trainers.sft import SFTArguments, SFTTrainer
from model_configs import tiny_config

POSITIONS = 40
LONG_PROMPT = "1+" * 13 + "1="  # 28 characters, a token each, and the BOS: 29 tokens


def _trainer(tmp_path, prompt: str, max_new_tokens: int) -> SFTTrainer:
    tokenizer = build_arithmetic_chat_tokenizer()
    model = types.SimpleNamespace(config=tiny_config(vocab_size=len(tokenizer), max_position_embeddings=POSITIONS))
    rows = datasets.Dataset.from_list([{"prompt": prompt, "completion": str(i % 10)} for i in range(40)])
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_length=32, max_steps=1, train_batch_size=4,
                                  report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
                                  validation_split_percentage=20)
    return SFTTrainer(arguments, SFTArguments(generation_eval_samples=4, max_new_tokens=max_new_tokens),
                      tokenizer=tokenizer, model=model, dataset_train=rows)


def test_generation_past_the_models_positions_is_refused_naming_the_fields(tmp_path):
    trainer = _trainer(tmp_path, LONG_PROMPT, max_new_tokens=16)  # 29 + 16 - 1 = 44 positions > 40
    with pytest.raises(ArgumentError) as info:
        trainer.prepare_datasets()
    text = str(info.value)
    assert info.value.field == "max_new_tokens", text
    for said in ("max_position_embeddings=40", "29 tokens", "max_new_tokens 16", "44", "max_new_tokens 12",
                 "max_length"):
        assert said in text, (said, text)


def test_generation_that_fits_is_kept(tmp_path):
    trainer = _trainer(tmp_path, LONG_PROMPT, max_new_tokens=12)  # 29 + 12 - 1 = 40: the last position fits
    trainer.prepare_datasets()
    assert trainer.evaluators[-1].max_new_tokens == 12
    trainer = _trainer(tmp_path, "1+1=", max_new_tokens=16)  # short prompts leave the room
    trainer.prepare_datasets()


def test_the_embedded_tasks_own_generation_is_cut_to_fit_with_a_warning(tmp_path, caplog):
    """Without data the arithmetic task evaluates by generation unasked: a small model's positions shorten the
    generation (the answers are a few tokens) instead of refusing a run that asked for nothing."""
    tokenizer = build_arithmetic_chat_tokenizer()
    model = types.SimpleNamespace(config=tiny_config(vocab_size=len(tokenizer), max_position_embeddings=24))
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_length=16, max_steps=1, train_batch_size=4,
                                  report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False)
    trainer = SFTTrainer(arguments, tokenizer=tokenizer, model=model)
    with caplog.at_level("WARNING", logger="easytrain"):
        trainer.prepare_datasets()
    longest = max(map(len, trainer.evaluators[-1].prompts))
    assert trainer.evaluators[-1].max_new_tokens == 24 - longest + 1 < 64
    assert "max_new_tokens 64 would run past max_position_embeddings=24" in caplog.text, caplog.text
