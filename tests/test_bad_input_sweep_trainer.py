"""Bad inputs that only a trainer can see (the rows, the tokenizer, a path on disk, the model's layers): each is
refused as one of easytrain's errors that names the field or column and the fix, before the train step is traced
(no compile, no update), and a refusal in an output_dir holding a finished run leaves its files byte for byte, even
with overwrite_output_dir or a resume that would move newer checkpoints. Argument-level refusals are in
test_bad_input_sweep.py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import datasets
import pytest

from easytrain import BaseTrainer, TrainingArguments, steps
from easytrain.errors import EasytrainError
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.dpo_arguments import DPOArguments
from easytrain.trainers.sft import SFTArguments, SFTTrainer

MESSAGES = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]
PAIRS = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4
PROMPTS = [{"prompt": "1+1=", "completion": "2"}] * 4


def _args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=32, train_batch_size=2, eval_batch_size=2, max_steps=1,
                  eval_strategy="no", save_strategy="no", report_to=["jsonl"], disable_progress_bar=True,
                  save_pretrained_at_end=False, validation_split_percentage=0)
    return TrainingArguments(**(values | overrides))


def _tokenizer(**changes: Any) -> Any:
    tokenizer = build_arithmetic_chat_tokenizer()
    for name, value in changes.items():
        setattr(tokenizer, name, value)
    return tokenizer


def _rows(rows: list[dict[str, Any]]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


#: name -> (trainer from an output_dir, the field or column the message must name, a fragment of the fix).
CASES: dict[str, tuple[Callable[[Path], BaseTrainer], str, str]] = {
    "sft columns of no format": (lambda out: SFTTrainer(_args(out), tokenizer=_tokenizer(),
                                                        dataset_train=_rows([{"foo": "1+1"}] * 4)),
                                 "text_column", "Rename the columns"),
    "sft text of another type": (lambda out: SFTTrainer(_args(out), tokenizer=_tokenizer(),
                                                        dataset_train=_rows([{"text": 3}] * 4)),
                                 "'text'", "must be a str"),
    "sft missing completion": (lambda out: SFTTrainer(_args(out), tokenizer=_tokenizer(), dataset_train=_rows(
        [{"prompt": "1+1=", "completion": None}] * 4)), "'completion'", "fix the data"),
    "sft messages without a chat template": (lambda out: SFTTrainer(
        _args(out), tokenizer=_tokenizer(chat_template=None), dataset_train=_rows([{"messages": MESSAGES}] * 4)),
        "chat_template_path", "needs a chat template"),
    "sft text_column not in the rows": (lambda out: SFTTrainer(_args(out, text_column="body"), tokenizer=_tokenizer(),
                                                               dataset_train=_rows([{"text": "1+1=2"}] * 4)),
                                        "text_column", "not a column"),
    "sft prompt longer than max_length": (lambda out: SFTTrainer(_args(out, max_length=4), tokenizer=_tokenizer(),
                                                                 dataset_train=_rows(
        [{"prompt": "1+1+1+1+1+1+1+1=", "completion": "8"}] * 4)), "max_length", "Raise `max_length`"),
    "sft fewer rows than a batch": (lambda out: SFTTrainer(_args(out, train_batch_size=8), tokenizer=_tokenizer(),
                                                           dataset_train=_rows(PROMPTS)),
                                    "train_batch_size", "lower `train_batch_size`"),
    "sft max_length beyond the model": (lambda out: SFTTrainer(_args(out, max_length=100_000), tokenizer=_tokenizer(),
                                                               dataset_train=_rows(PROMPTS)),
                                        "max_length", "or less"),
    "lora targets matching nothing": (lambda out: SFTTrainer(
        _args(out, lora_rank=2, lora_target_modules=["nothing_proj"]), tokenizer=_tokenizer(),
        dataset_train=_rows(PROMPTS)), "lora_target_modules", "match no dense layer"),
    "resume from a path that is no checkpoint": (lambda out: SFTTrainer(
        _args(out, resume_from_checkpoint=str(out.parent)), tokenizer=_tokenizer(), dataset_train=_rows(PROMPTS)),
        "resume_from_checkpoint", "leave resume_from_checkpoint unset"),
    "dpo pairs without rejected": (lambda out: DPOTrainer(_args(out), tokenizer=_tokenizer(), dataset_train=_rows(
        [{"prompt": "1+1=", "chosen": "2"}] * 4)), "rejected", "Rename the columns"),
    "dpo rejected of another type": (lambda out: DPOTrainer(_args(out), tokenizer=_tokenizer(), dataset_train=_rows(
        [{"prompt": "1+1=", "chosen": "2", "rejected": 3}] * 4)), "'rejected'", "give three strings"),
    "dpo chat pairs without a chat template": (lambda out: DPOTrainer(
        _args(out), DPOArguments(), tokenizer=_tokenizer(chat_template=None),
        dataset_train=_rows([{"chosen": MESSAGES, "rejected": MESSAGES[:1] + [{"role": "assistant",
                                                                            "content": "3"}]}] * 4)),
        "chat_template_path", "needs a chat template"),
    "lm train_file missing": (lambda out: BaseTrainer(_args(out, train_file=str(out.parent / "none.jsonl")),
                                                      tokenizer=_tokenizer()), "train_file", "check the path"),
    "lm model_config unknown": (lambda out: BaseTrainer(_args(out, model_config="huge")), "model_config",
                                "pass one of those"),
    "init_weights_from missing": (lambda out: BaseTrainer(_args(out, init_weights_from=str(out.parent / "none"))),
                                  "init_weights_from", "neither an exported model"),
}


@pytest.fixture
def train_step_traces(monkeypatch) -> list[int]:
    """How often the train step was traced (each trace precedes a compile): 0 means no training compute began."""
    traces, traced = [0], steps.train_step

    def counting(*args: Any, **kwargs: Any) -> Any:
        traces[0] += 1
        return traced(*args, **kwargs)

    monkeypatch.setattr(steps, "train_step", counting)
    return traces


def _refusal(make: Callable[[Path], BaseTrainer], output_dir: Path) -> EasytrainError:
    with pytest.raises(EasytrainError) as error:
        make(output_dir).train()
    return error.value


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_refused_by_name_before_the_train_step_is_traced(name, tmp_path, train_step_traces):
    make, field, fix = CASES[name]
    error = _refusal(make, tmp_path / "run")
    assert field in str(error) and fix in str(error), str(error)
    assert train_step_traces[0] == 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_sweeps_fixture_trains_when_nothing_is_wrong(tmp_path, train_step_traces):
    """The control: the same set-up with good data traces the train step, so a count of 0 above means something."""
    SFTTrainer(_args(tmp_path / "run"), SFTArguments(), tokenizer=_tokenizer(), dataset_train=_rows(PROMPTS)).train()
    assert train_step_traces[0] >= 1


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


#: Refusals late in set-up: a LoRA target matching no layer (once the model is built), a ranking metric no
#: evaluation produces (once the eval step is traced); named by the refusal, or by the resume check that refuses the
#: changed arguments first.
LATE_REFUSALS = {"lora": dict(lora_rank=2, lora_target_modules=["nothing_proj"]),
                 "metric": dict(eval_strategy="steps", eval_steps=2, metric_for_best_model="eval_bleu")}


@pytest.mark.parametrize("claim,refusal", [("overwrite", "lora"), ("resume-older-step", "metric")])
def test_a_refusal_leaves_an_existing_runs_files_untouched(claim, refusal, run_copy, train_step_traces):
    """Overwriting would remove the finished run's checkpoints, resuming its step 2 move checkpoint 4 aside: a
    refused run does neither."""
    from runs import args_for

    overrides = ({"overwrite_output_dir": True} if claim == "overwrite"
                 else {"resume_from_checkpoint": str(run_copy / "checkpoints" / "2")})
    before = _tree_digest(run_copy)
    assert any(name.startswith("checkpoints/4/") for name in before)
    with pytest.raises(EasytrainError, match="lora_target_modules|metric_for_best_model"):
        BaseTrainer(args_for(run_copy, **overrides, **LATE_REFUSALS[refusal])).train()
    assert _tree_digest(run_copy) == before
    assert train_step_traces[0] == 0


def test_a_chat_template_over_rows_it_never_renders_is_warned_about(caplog):
    """Prompt-completion strings and plain text train the same tokens with or without chat_template_path (it was
    silent); conversations render through it."""
    from easytrain.trainers.sft import check_template_read

    with caplog.at_level("WARNING", logger="easytrain"):
        assert not check_template_read(_rows(PROMPTS), "chat.jinja")
        assert check_template_read(_rows([{"messages": MESSAGES}]), "chat.jinja")
    warned = [r.getMessage() for r in caplog.records if "chat_template_path" in r.getMessage()]
    assert len(warned) == 1 and "prompt_completion" in warned[0] and "changes no training token" in warned[0]


def test_a_trainer_without_eval_data_evaluates_a_given_set_with_a_ranking_metric_and_generation_asked(tmp_path, caplog):
    """`evaluate(dataset)` alone ranks no checkpoint and generates nothing, so metric_for_best_model and
    generation_eval_samples (a config shared with the training stage) have nothing to refuse there: both are warned
    about at set-up, for a trainer that would train without them (before, they were refused, or silently unread)."""
    trainer = SFTTrainer(_args(tmp_path / "run", eval_strategy="steps", eval_steps=1, metric_for_best_model="eval_loss",
                               save_total_limit=None), SFTArguments(generation_eval_samples=2),
                         tokenizer=_tokenizer(), dataset_train=_rows(PROMPTS))
    with caplog.at_level("WARNING", logger="easytrain"):
        assert trainer.evaluate(_rows(PROMPTS))["eval_loss"] > 0
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "metric_for_best_model" in warned and "generation_eval_samples" in warned, warned
    assert warned.count("no evaluation data") == 2, warned
