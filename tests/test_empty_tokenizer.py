"""A pretrained folder without tokenizer files: transformers builds a tokenizer that encodes every text to no
tokens (Qwen2's class from config.json alone), and a run on it trained on EOS ids only and exported it. Refused
by field before any data work."""

from pathlib import Path

import pytest
from flax import nnx

from easytrain import BaseTrainer, TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.models import init_model, save_pretrained
from easytrain.tasks import build_arithmetic_tokenizer
from model_configs import family_config


def checkpoint(directory: Path, model_type: str, with_tokenizer: bool) -> Path:
    config = family_config(model_type)
    save_pretrained(directory, nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config)
    if with_tokenizer:
        build_arithmetic_tokenizer().save_pretrained(directory)
    return directory


def arguments(output_dir: Path, **fields) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), max_length=32, train_batch_size=8, max_steps=1,
                             eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                             save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=8, **fields)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_a_model_folder_without_tokenizer_files_is_refused_by_field(tmp_path, model_type):
    base = checkpoint(tmp_path / "base", model_type, with_tokenizer=False)
    with pytest.raises(ArgumentError, match="model_name_or_path.*no token but its special ones.*--tokenizer_name"):
        BaseTrainer(arguments(tmp_path / "run", model_name_or_path=str(base))).setup()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_tokenizer_folder_without_tokenizer_files_is_refused_by_field(tmp_path):
    base = checkpoint(tmp_path / "base", "qwen2", with_tokenizer=True)
    empty = checkpoint(tmp_path / "empty", "qwen2", with_tokenizer=False)
    with pytest.raises(ArgumentError, match="tokenizer_name.*no token but its special ones"):
        BaseTrainer(arguments(tmp_path / "run", model_name_or_path=str(base), tokenizer_name=str(empty))).setup()


def test_a_model_folder_with_its_tokenizer_trains(tmp_path):
    base = checkpoint(tmp_path / "base", "qwen2", with_tokenizer=True)
    trainer = BaseTrainer(arguments(tmp_path / "run", model_name_or_path=str(base)))
    trainer.setup()
    assert trainer.tokenizer("12+34=46", add_special_tokens=False).input_ids


def test_a_tokenizer_that_drops_unknown_characters_is_not_refused(tmp_path):
    """A domain tokenizer (DNA letters, no unknown token) encodes common text to nothing and is still a tokenizer:
    only one without any token but its special ones is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from easytrain.trainers.builders import load_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    bpe.train_from_iterator(["ACGTTGCAACGGTTAC GATTACA CCGGTTAA"] * 50,
                            trainers.BpeTrainer(vocab_size=40, special_tokens=["<s>", "</s>", "<pad>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(tmp_path)
    assert load_tokenizer("tokenizer_name", tmp_path)("GATTACA", add_special_tokens=False).input_ids
