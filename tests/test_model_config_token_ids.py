"""A `--model_config` whose EOS (BOS, decoder start) is no token id of the model (-1, or at or past its vocab_size)
is refused when the trainer reads it, before any text is tokenised and before output_dir is claimed: the trainers
build the model from the config directly, not through `init_model`, so such a run trained to the end and only the
final export refused it (its generation_config.json would be refused by the reload). A pad out of range still
trains, as it loads."""

import json

import datasets
import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.sft import SFTTrainer

import tokenising_spy
from model_configs import family_config

VOCAB = 320  # room for the test tokenizer's 300 tokens
tokenised = tokenising_spy.tokenised  # the spy on tokenisation, a fixture


def _config_file(tmp_path, **changes) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(family_config("qwen2", vocab_size=VOCAB).to_dict() | changes))
    return str(path)


def _trainer(kind: str, tmp_path, config_file: str, tokenizer_dir: str, text_lines: list[str]):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, max_length=16, train_batch_size=4,
                             eval_strategy="no", save_strategy="no", save_pretrained_at_end=False,
                             report_to=["none"], model_config=config_file, tokenizer_name=tokenizer_dir)
    if kind == "dpo":
        rows = {"prompt": text_lines[:8], "chosen": text_lines[1:9], "rejected": text_lines[2:10]}
        return DPOTrainer(args, dataset_train=datasets.Dataset.from_dict(rows))
    rows = {"text": text_lines} if kind == "base" else {"prompt": text_lines[:8], "completion": text_lines[1:9]}
    return (BaseTrainer if kind == "base" else SFTTrainer)(args, dataset_train=datasets.Dataset.from_dict(rows))


@pytest.mark.parametrize("kind, field, value", [("base", "eos_token_id", -1), ("base", "eos_token_id", [2, VOCAB]),
                                                ("base", "bos_token_id", VOCAB), ("sft", "eos_token_id", VOCAB),
                                                ("dpo", "eos_token_id", -1)])
def test_a_model_config_with_ids_the_model_lacks_is_refused_before_any_work(tmp_path, tokenizer_dir, text_lines,
                                                                            tokenised, kind, field, value):
    """Was: trained to the end, then the export refused: 'config (written to generation_config.json) sets ...'."""
    config_file = _config_file(tmp_path, **{field: value})
    trainer = _trainer(kind, tmp_path, config_file, tokenizer_dir, text_lines)
    with pytest.raises(ArgumentError, match=rf"{config_file} sets '{field}' to .*Fix {config_file}: set "
                                            rf"'{field}' to the id the tokenizer uses") as error:
        trainer.train()
    assert error.value.field == "model_config"
    assert not tokenised and not any((tmp_path / "run").iterdir())  # made at construction; not claimed


def test_a_pad_past_the_vocabulary_is_kept(tmp_path, tokenizer_dir, text_lines, tokenised):
    """A pad at vocab_size (added to the tokenizer after training) loads, so it trains: the run gets to its data."""
    trainer = _trainer("base", tmp_path, _config_file(tmp_path, pad_token_id=VOCAB), tokenizer_dir, text_lines)
    with pytest.raises(AssertionError, match="tokenised before"):
        trainer.train()


def test_a_given_model_whose_export_would_write_ids_the_load_refuses_is_refused_before_training(tmp_path):
    """A model built directly (not through `init_model`) from a config with an EOS of -1: was trained, then the
    final export refused it ('config (written to generation_config.json) sets 'eos_token_id' to -1')."""
    from easytrain.models import LlamaForCausalLM
    from easytrain.tasks import build_arithmetic_tokenizer
    from flax import nnx
    from model_configs import tiny_config

    tokenizer = build_arithmetic_tokenizer()
    with nnx.use_eager_sharding(False):  # as init_model builds it
        model = LlamaForCausalLM(tiny_config(vocab_size=len(tokenizer), eos_token_id=-1), rngs=nnx.Rngs(0))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, max_length=32, train_batch_size=8,
                             eval_strategy="no", save_strategy="no", report_to=["none"], max_train_samples=16)
    with pytest.raises(ArgumentError, match=r"config \(written to generation_config\.json\) sets 'eos_token_id' "
                                            r"to -1.*Set config\.eos_token_id") as error:
        BaseTrainer(args, model=model, tokenizer=tokenizer).train()
    assert error.value.field == "save_pretrained_at_end"
    assert not (tmp_path / "run" / "checkpoints").exists()
