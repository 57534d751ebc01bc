"""A run saved before the bad-input sweep's refusals still reruns from its own arguments.json (`easytrain train
--config OUTPUT_DIR/arguments.json`, the command every refusal of a resume names): what an older easytrain accepted
and recorded, an empty path it read as unset, a `metric_for_best_model` that ranked nothing, SFT's
`packing_strategy` without packing, is refused for a fresh run only. A resume is left to the comparison with its
checkpoint, where an empty string is the unset value it was read as (as `lora_*` fields without `lora_rank` are left to
it, tests/test_old_checkpoint_resume.py). A run without evaluation data is warned about its metric_for_best_model and
generation_eval_samples, not refused (test_bad_input_sweep_trainer.py)."""

from __future__ import annotations

import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.trainers.resume_checks import check_resumable
from easytrain.trainers.sft import SFTArguments, SFTTrainer, check_packing_read


def _info(arguments: dict, task_arguments: dict) -> dict:
    return {"format_version": 1, "arguments": arguments, "model_config": None, "task_arguments": task_arguments}


def _args(**values) -> TrainingArguments:
    return TrainingArguments(output_dir="unused", report_to=["jsonl"], **values)


def test_an_empty_path_an_older_run_saved_resumes_as_unset():
    """Its arguments.json holds '' (refused now, 'null in a config file' the fix): that resume was refused as a change
    of the data order ('dataset_config_name: checkpoint '' vs now None'), so no rerun was exact."""
    now = _args(resume_from_checkpoint="latest").to_dict()
    old = {**now, "dataset_config_name": "", "tokenizer_name": ""}
    assert check_resumable(_info(old, {"chat_template_path": ""}),
                           _info(now, {"chat_template_path": None})) == []
    with pytest.raises(ArgumentError, match="dataset_config_name: checkpoint '' vs now 'other'"):
        check_resumable(_info(old, {}), _info({**now, "dataset_config_name": "other"}, {}))
    with pytest.raises(ArgumentError, match="system_prompt: checkpoint '' vs now None"):  # a task's own: '' may mean
        check_resumable(_info(now, {"system_prompt": ""}), _info(now, {"system_prompt": None}))  # an empty turn


def test_a_metric_for_best_model_that_ranked_nothing_reruns_as_a_resume():
    """Refused for a fresh run (nothing ranks it), left alone on a resume: the older run recorded it so."""
    old = dict(metric_for_best_model="eval_loss", eval_strategy="no")
    with pytest.raises(ArgumentError, match="eval_strategy is 'no'"):
        _args(**old)
    assert _args(**old, resume_from_checkpoint="latest").metric_for_best_model == "eval_loss"


def test_a_packing_strategy_without_packing_is_refused_for_a_fresh_run_only(tmp_path):
    """packing_strategy is read only when packing: 'wrapped' alone trained padded rows without a word. An older run's
    arguments.json holds it so; its resume compares it with the checkpoint's (task_arguments), which holds it too."""
    sft = SFTArguments(packing_strategy="wrapped")
    with pytest.raises(ArgumentError, match="--packing") as error:
        SFTTrainer(TrainingArguments(output_dir=str(tmp_path / "run"), report_to=["jsonl"]), sft)
    assert error.value.field == "packing_strategy" and not (tmp_path / "run").exists()
    check_packing_read(sft, resuming=True)
    check_packing_read(SFTArguments(packing=True, packing_strategy="wrapped"))

