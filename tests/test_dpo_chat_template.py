"""DPO reads a chat template file as SFT does (`chat_template_path`): a tokenizer without one can train on chat pairs
from the command line, and the template travels with the run (checked at construction, recorded for resume)."""

from __future__ import annotations

import datasets
import pytest
from chat_fixtures import CHATML, build_chat_tokenizer

from easytrain import TrainingArguments
from easytrain.data import DataError
from easytrain.trainers.dpo import DPOArguments, DPOTrainer

USER = [{"role": "user", "content": "Two plus two?"}]
PAIRS = {"prompt": [USER] * 16, "chosen": [[{"role": "assistant", "content": "four"}]] * 16,
         "rejected": [[{"role": "assistant", "content": "five"}]] * 16}


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), max_length=48, train_batch_size=8, max_steps=1,
                             eval_strategy="no", save_strategy="no", report_to=[], disable_progress_bar=True,
                             save_pretrained_at_end=False)


def test_a_missing_template_file_is_refused_at_construction(tmp_path):
    with pytest.raises(DataError, match="chat_template_path"):
        DPOArguments(chat_template_path=str(tmp_path / "missing.jinja"))


def test_chat_pairs_train_with_the_template_file_and_record_it(tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    tokenizer = build_chat_tokenizer("chatml")
    tokenizer.chat_template = None
    trainer = DPOTrainer(_args(tmp_path), DPOArguments(chat_template_path=str(template)), tokenizer=tokenizer,
                         dataset_train=datasets.Dataset.from_dict(PAIRS))
    trainer.setup()
    assert trainer.tokenizer.chat_template == CHATML
    assert trainer.run_info()["task_arguments"]["chat_template_path"] == str(template)


def test_string_pairs_with_a_template_file_are_warned_about_once(tmp_path, caplog):
    """Prompt/chosen/rejected strings are tokenised as they are, never through a chat template: the file changes no
    training token, which SFT warns about for its string rows and DPO passed over without a word."""
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    strings = datasets.Dataset.from_dict({"prompt": ["Two plus two?"] * 16, "chosen": [" four"] * 16,
                                          "rejected": [" five"] * 16})
    trainer = DPOTrainer(_args(tmp_path), DPOArguments(chat_template_path=str(template)),
                         tokenizer=build_chat_tokenizer("chatml"), dataset_train=strings, dataset_eval=strings)
    with caplog.at_level("WARNING", logger="easytrain"):
        trainer.setup()
    warned = [r.getMessage() for r in caplog.records if "chat_template_path" in r.getMessage()]
    assert len(warned) == 1 and "string" in warned[0] and "changes no training token" in warned[0], warned
    chats = DPOTrainer(_args(tmp_path / "chats"), DPOArguments(chat_template_path=str(template)),
                       tokenizer=build_chat_tokenizer("chatml"), dataset_train=datasets.Dataset.from_dict(PAIRS))
    caplog.clear()
    with caplog.at_level("WARNING", logger="easytrain"):
        chats.setup()
    assert not [r for r in caplog.records if "chat_template_path" in r.getMessage()]
