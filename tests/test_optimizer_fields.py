"""Optimizer settings the chosen optimizer does not read are warned about when the arguments are checked, and the
help texts say what each optimizer reads (and what weight decay and text_column apply to)."""

import dataclasses
import logging

import pytest

from easytrain import TrainingArguments


def _help(name: str) -> str:
    (field,) = [f for f in dataclasses.fields(TrainingArguments) if f.name == name]
    return field.metadata["help"]


def _warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "optimizer" in r.getMessage()]


@pytest.mark.parametrize("settings, unread", [
    (dict(optimizer="adafactor", adam_beta1=0.51, adam_beta2=0.52, adam_epsilon=0.1),
     ["adam_beta1", "adam_beta2", "adam_epsilon"]),
    (dict(optimizer="lion", adam_epsilon=0.11), ["adam_epsilon"]),
    (dict(optimizer="sgd", adam_beta1=0.53), ["adam_beta1"]),
    (dict(optimizer="adamw", sgd_momentum=0.12), ["sgd_momentum"]),
    (dict(optimizer="adafactor", sgd_momentum=0.13), ["sgd_momentum"]),
])
def test_fields_the_optimizer_does_not_read_are_warned_about_once(tmp_path, caplog, settings, unread):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), **settings)
        TrainingArguments(output_dir=str(tmp_path), **settings)  # checked again (a rerun's copy): not warned again
    (message,) = _warned(caplog)
    assert all(name in message for name in unread) and f"optimizer={settings['optimizer']!r}" in message, message


@pytest.mark.parametrize("settings", [dict(optimizer="lion", adam_beta1=0.54, adam_beta2=0.55),
                                      dict(optimizer="sgd", sgd_momentum=0.14), dict(optimizer="adafactor"),
                                      dict(optimizer="adamw", adam_epsilon=1e-6)])
def test_fields_the_optimizer_reads_are_not_warned_about(tmp_path, caplog, settings):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), **settings)
    assert not _warned(caplog)


def test_help_texts_say_what_each_setting_applies_to():
    optimizer = _help("optimizer")
    for name in ("adamw", "adafactor", "lion", "sgd", "adam_beta1", "adam_epsilon", "sgd_momentum", "128", "RMS"):
        assert name in optimizer, name
    decay = _help("weight_decay")
    assert "2 or more dimensions" in decay and "configure_optimizer" in decay
    text = _help("text_column")
    assert "SFT" in text and "DPO" in text and "'text'" in text


@pytest.mark.parametrize("lora", [dict(lora_rank=4), dict(lora_adapter_path="adapter")])
def test_adafactor_with_lora_is_warned_about_its_relative_step(tmp_path, caplog, lora):
    """Adafactor scales each update by the parameter's RMS (at least 1e-3): LoRA's B starts at zero, so it moves
    1000x slower than learning_rate says (30 steps at 1e-3: |B| 3e-5, against AdamW's 2.7e-2), and nothing said so."""
    from easytrain.argument_checks import warn_adafactor_lora

    warn_adafactor_lora.cache_clear()  # warned once per process: each case from a clean slate
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), optimizer="adafactor", **lora)
    (message,) = [m for m in _warned(caplog) if "LoRA" in m]
    assert "optimizer='adafactor'" in message and "multiply_by_parameter_scale=False" in message, message
    assert "optimizer='adamw'" in message, message


def test_adafactor_without_lora_and_adamw_with_lora_are_not_warned_about_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), optimizer="adafactor")
        TrainingArguments(output_dir=str(tmp_path), optimizer="adamw", lora_rank=4)
    assert not [m for m in _warned(caplog) if "LoRA" in m], _warned(caplog)
