"""Bad input gets one clear easytrain error naming the field and the fix, before any compute starts.

Each case once ended in a third-party traceback (transformers, huggingface_hub, datasets, jinja2, jax) that
named no field. The original exception stays chained as `__cause__`.
"""

import json

import datasets
import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.cli import main
from easytrain.data import load_text_datasets, tokenize_and_group
from easytrain.data.errors import DataError
from easytrain.errors import EasytrainError
from easytrain.trainers import builders


def _args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, max_length=16, train_batch_size=4,
                             eval_batch_size=4, save_strategy="no", eval_strategy="no",
                             save_pretrained_at_end=False, report_to=["none"], **kwargs)


# ----------------------------------------------------------------------------- tokenizer / model paths


@pytest.mark.parametrize("field", ["tokenizer_name", "model_name_or_path"])
def test_missing_local_path_names_the_field(tmp_path, field):
    missing = str(tmp_path / "nonexistent")
    with pytest.raises(ArgumentError) as info:
        builders.build_tokenizer(_args(tmp_path, **{field: missing}), embedded=False)
    assert info.value.field == field
    assert "does not exist" in str(info.value) and "repo_type" not in str(info.value)


def test_unknown_hub_id_offline_names_the_field(tmp_path):
    with pytest.raises(ArgumentError) as info:
        builders.build_tokenizer(_args(tmp_path, tokenizer_name="nosuchuser/nosuchtokenizer"), embedded=False)
    assert info.value.field == "tokenizer_name" and info.value.__cause__ is not None


def test_model_directory_with_invalid_config_json_names_the_field(tmp_path, tokenizer_dir):
    model = tmp_path / "garbage"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    with pytest.raises(ArgumentError) as info:
        builders.build_tokenizer(_args(tmp_path, model_name_or_path=str(model)), embedded=False)
    assert info.value.field == "model_name_or_path" and "config.json" in str(info.value)
    with pytest.raises(ArgumentError) as info:  # with a tokenizer of its own, the config is what fails
        from transformers import AutoTokenizer
        builders.build_model_config(_args(tmp_path, model_name_or_path=str(model)),
                                    AutoTokenizer.from_pretrained(tokenizer_dir))
    assert info.value.field == "model_name_or_path"


def test_model_directory_without_config_or_tokenizer_names_the_field(tmp_path):
    model = tmp_path / "nocfg"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ArgumentError) as info:
        builders.build_tokenizer(_args(tmp_path, model_name_or_path=str(model)), embedded=False)
    assert info.value.field == "model_name_or_path"


def test_tokenizer_path_string_is_loaded(tmp_path, tokenizer_dir):
    tokenizer = builders.ensure_pad_token(tokenizer_dir)
    assert tokenizer.pad_token is not None and len(tokenizer) > 0


def test_tokenizer_of_the_wrong_type_is_refused_by_name():
    with pytest.raises(TypeError, match="tokenizer"):
        builders.ensure_pad_token(123)


def test_base_trainer_accepts_a_tokenizer_path(tmp_path, tokenizer_dir, text_lines):
    from easytrain import BaseTrainer

    trainer = BaseTrainer(_args(tmp_path), tokenizer=tokenizer_dir,
                          dataset_train=datasets.Dataset.from_dict({"text": text_lines * 4}))
    train, _ = trainer.prepare_datasets()
    assert len(train) > 0 and trainer.tokenizer.pad_token is not None


# ----------------------------------------------------------------------------- --model_config files


def _config_file(tmp_path, text: str) -> str:
    path = tmp_path / "config.json"
    path.write_text(text)
    return str(path)


def test_model_config_with_inconsistent_heads_names_the_field(tmp_path):
    from easytrain.models.presets import PRESETS, llama_config

    path = _config_file(tmp_path, json.dumps({**PRESETS["tiny"], "num_attention_heads": 3, "model_type": "llama"}))
    with pytest.raises(ArgumentError) as info:
        llama_config(path, vocab_size=32)
    assert info.value.field == "model_config" and "attention heads" in str(info.value)


def test_model_config_that_is_not_json_names_the_field(tmp_path):
    from easytrain.models.presets import llama_config

    with pytest.raises(ArgumentError) as info:
        llama_config(_config_file(tmp_path, "{not json"), vocab_size=32)
    assert info.value.field == "model_config" and "JSON" in str(info.value)
    with pytest.raises(ArgumentError, match="model_config"):
        llama_config(_config_file(tmp_path, "[1, 2]"), vocab_size=32)


# ----------------------------------------------------------------------------- data files and names


def test_empty_train_file_names_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="train_file") as info:
        load_text_datasets(train_file=empty, cache_dir=tmp_path / "cache")
    assert str(empty) in str(info.value)


def test_broken_json_lines_name_the_file(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops\n')
    with pytest.raises(DataError, match="train_file") as info:
        load_text_datasets(train_file=broken, cache_dir=tmp_path / "cache")
    assert str(broken) in str(info.value) and info.value.__cause__ is not None


def test_unreachable_dataset_name_names_the_field(tmp_path):
    with pytest.raises(DataError, match="dataset_name") as info:
        load_text_datasets(dataset_name="nosuchuser/nosuchdataset", cache_dir=tmp_path / "cache")
    assert "nosuchuser/nosuchdataset" in str(info.value)


def test_text_column_of_integers_names_the_column(tokenizer):
    numbers = datasets.Dataset.from_dict({"text": list(range(50))})
    with pytest.raises(DataError, match="text_column"):
        tokenize_and_group(numbers, tokenizer, text_column="text", max_length=8)


# ----------------------------------------------------------------------------- SFT / DPO arguments


def test_sft_missing_chat_template_file_names_the_field(tmp_path):
    from easytrain.trainers.sft import SFTArguments, SFTTrainer

    with pytest.raises(EasytrainError, match="chat_template_path") as info:
        SFTTrainer(_args(tmp_path), SFTArguments(chat_template_path=str(tmp_path / "nope.jinja")))
    assert "does not exist" in str(info.value)


def test_sft_invalid_jinja_chat_template_names_the_field(tmp_path):
    from easytrain.trainers.sft import SFTArguments, SFTTrainer

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for message in messages %}{{ message['content'] }}}{% endfor")
    with pytest.raises(EasytrainError, match="chat_template_path") as info:
        SFTTrainer(_args(tmp_path), SFTArguments(chat_template_path=str(bad)))
    assert info.value.__cause__ is not None


def test_sft_and_dpo_refuse_each_others_arguments(tmp_path):
    from easytrain.trainers.dpo import DPOArguments, DPOTrainer
    from easytrain.trainers.sft import SFTArguments, SFTTrainer

    with pytest.raises(TypeError, match="SFTArguments"):
        SFTTrainer(_args(tmp_path), DPOArguments())
    with pytest.raises(TypeError, match="DPOArguments"):
        DPOTrainer(_args(tmp_path), SFTArguments())


def test_dpo_missing_reference_path_names_the_field(tmp_path):
    from easytrain.trainers.dpo import DPOArguments, DPOTrainer

    with pytest.raises(ArgumentError) as info:
        DPOTrainer(_args(tmp_path), DPOArguments(ref_model_name_or_path=str(tmp_path / "noref")))
    assert info.value.field == "ref_model_name_or_path" and "repo_type" not in str(info.value)


def test_dpo_unknown_reference_hub_id_is_refused_before_any_data_work(tmp_path, monkeypatch):
    """An id the hub (here: the offline cache) cannot resolve failed only once the reference loaded, after the
    datasets were tokenised."""
    from easytrain.trainers.dpo import DPOArguments, DPOTrainer

    monkeypatch.setattr(DPOTrainer, "prepare_datasets", lambda self: pytest.fail("data work came first"))
    with pytest.raises(ArgumentError, match=r"^ref_model_name_or_path: cannot load the reference model's config "
                                            r"from 'nosuchuser/nosuchmodel' \(HF_HUB_OFFLINE=1"):
        DPOTrainer(_args(tmp_path), DPOArguments(ref_model_name_or_path="nosuchuser/nosuchmodel")).setup()


def test_resolve_checkpoint_of_a_missing_path_gives_no_hub_jargon(tmp_path):
    from easytrain.models.hf_io import CheckpointError
    from easytrain.models.hf_load import resolve_checkpoint

    with pytest.raises(CheckpointError, match="does not exist") as info:
        resolve_checkpoint(tmp_path / "noref")
    assert "repo_type" not in str(info.value)


# ----------------------------------------------------------------------------- CLI


def test_task_that_is_not_a_trainer_names_the_task(tmp_path, capsys):
    assert main(["train", "--output_dir", str(tmp_path / "run"), "--task", "json:dumps", "--max_steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easytrain: error: task:") and "Traceback" not in err


def test_process_id_out_of_range_names_the_field(tmp_path, monkeypatch):
    import jax

    from easytrain import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    args = _args(tmp_path, num_processes=2, process_id=1, coordinator_address="localhost:1234")
    args.process_id = 5  # TrainingArguments checks it too; distributed.initialize must not rely on that
    with pytest.raises(ArgumentError) as info:
        distributed.initialize(args)
    assert info.value.field == "process_id" and not calls


def test_plot_out_that_is_a_file_names_the_flag(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["plot", str(run), "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easytrain: error: out:") and "Traceback" not in err


@pytest.mark.parametrize("text, field, expected", [
    ("beta: [1]\n", "beta", r"must be a number, got \[1\] \(list\)"),
    ("ref_model_sync_steps: 5.5\n", "ref_model_sync_steps", r"must be an integer, got 5.5"),
    ("loss_weights: [1, heavy]\n", "loss_weights", r"must be a list of numbers or None, got \[1, 'heavy'\]"),
    ("precompute_ref_log_probs: 1\n", "precompute_ref_log_probs", r"must be True or False, got 1 \(int\)"),
    ("max_prompt_length: 64.0\n", "max_prompt_length", r"must be an integer or None, got 64.0.*Write 64"),
])
def test_a_task_field_of_the_wrong_type_in_a_config_file_is_named(tmp_path, text, field, expected):
    """A task's own fields from a --config file are checked like TrainingArguments' (argparse converts only the
    strings of a file; other values reached the dataclass unchecked, to fail later or train on nonsense)."""
    from easytrain.config_io import parse_task_arguments
    from easytrain.trainers.dpo import DPOArguments

    path = tmp_path / "run.yaml"
    path.write_text("task: dpo\n" + text)
    with pytest.raises(ArgumentError, match=rf"^{field}: {expected}"):
        parse_task_arguments(["--config", str(path)], (DPOArguments,), "dpo")


def test_a_single_string_for_a_task_list_field_in_a_config_file_is_a_one_element_list(tmp_path):
    from easytrain.config_io import parse_task_arguments
    from easytrain.trainers.dpo import DPOArguments

    path = tmp_path / "run.yaml"
    path.write_text("task: dpo\nloss_type: ipo\nloss_weights: [2]\n")
    _, (dpo,) = parse_task_arguments(["--config", str(path)], (DPOArguments,), "dpo")
    assert dpo.loss_type == ["ipo"] and dpo.loss_weights == [2]


def test_a_task_choice_outside_its_choices_in_a_config_file_is_named(tmp_path):
    """argparse checks choices only on the command line: a file's value was taken as it was."""
    from easytrain.config_io import parse_task_arguments
    from easytrain.trainers.sft import SFTArguments

    path = tmp_path / "run.yaml"
    path.write_text("task: sft\ntruncation_side: middle\n")
    with pytest.raises(ArgumentError, match=r"^truncation_side: must be one of 'right', 'left', 'drop', got 'middle'"):
        parse_task_arguments(["--config", str(path)], (SFTArguments,), "sft")
