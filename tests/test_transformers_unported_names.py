"""Every transformers.TrainingArguments field easytrain does not take gets a true hint: what easytrain offers instead,
or why none is needed (`dataloader_num_workers`, `tf32`, `ddp_backend`), never a bare "see --help"; and no name is
sent by spelling alone to a look-alike that does something else (`lr_scheduler_kwargs` to `lr_scheduler_type`,
`local_rank` to `lora_rank`, `deepspeed` to `seed`)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json

import pytest

from easytrain import BaseTrainer, TrainingArguments
from easytrain.cli import main
from easytrain.suggestions import (OTHER_FIELDS, TRANSFORMERS_FIELDS, _with_task, as_flags, as_keys,
                                   unknown_name_hint)

transformers = pytest.importorskip("transformers")

OURS = {field.name for field in dataclasses.fields(TrainingArguments)}
THEIRS = [field.name for field in dataclasses.fields(transformers.TrainingArguments) if not field.name.startswith("_")]
UNTAKEN = [name for name in THEIRS if name not in OURS]


#: Names of transformers.TrainingArguments for which the generic hint (`easytrain train --help`) is the right one,
#: each with why. None so far: each untaken name has something easytrain offers instead or a reason none is needed.
GENERIC_IS_RIGHT: dict[str, str] = {}


def test_every_untaken_transformers_name_says_what_easytrain_offers_instead():
    generic = [name for name in UNTAKEN if name not in GENERIC_IS_RIGHT
               and "--help` for the list" in unknown_name_hint(name, None, OURS, as_keys)]
    assert not generic, generic
    assert set(GENERIC_IS_RIGHT) <= set(UNTAKEN), set(GENERIC_IS_RIGHT) - set(UNTAKEN)


def test_no_transformers_name_is_sent_to_a_look_alike_by_spelling_alone():
    by_spelling = {name: difflib.get_close_matches(name, OURS, n=1)[0] for name in UNTAKEN
                   if name not in TRANSFORMERS_FIELDS and name not in OTHER_FIELDS
                   and difflib.get_close_matches(name, OURS, n=1)}
    assert not by_spelling, by_spelling


@pytest.mark.parametrize(("name", "present", "absent"), [
    ("lr_scheduler_kwargs", ["warmup_steps", "configure_schedule(total_steps)", "'cosine'"], ["Did you mean"]),
    ("optim_args", ["adam_beta1", "sgd_momentum", "configure_optimizer(schedule)"], ["Did you mean"]),
    ("optim_target_modules", ["GaLore"], ["Did you mean"]),
    ("local_rank", ["Did you mean 'process_id'?", "coordinator_address"], ["lora_rank"]),
    ("deepspeed", ["fsdp_size", "tensor_parallel_size"], ["Did you mean"]),
    ("fsdp", ["Did you mean 'fsdp_size'?", "full_shard"], []),
    ("fsdp_config", ["fsdp_size"], ["model_config"]),
    ("accelerator_config", ["data_parallel_size"], ["model_config"]),
    ("parallelism_config", ["data_parallel_size"], ["model_config"]),
    ("label_names", ["targets"], ["dataset_name"]),
    ("train_sampling_strategy", ["shuffled", "seed"], ["save_strategy"]),
    ("hub_strategy", ["final_model"], ["save_strategy"]),
    ("push_to_hub", ["final_model"], []),
    # save_strategy 'no' stops on a SIGTERM with no checkpoint (loop_ending.checkpoint_now)
    ("enable_jit_checkpoint", ["SIGTERM", "75", "unless save_strategy is 'no'"],
     ["resume_from_checkpoint", "whatever save_strategy"]),
    ("restore_callback_states_from_checkpoint", ["state_dict"], ["Did you mean"]),
    ("eval_delay", ["eval_steps"], ["Did you mean"]),
    ("eval_on_start", ["eval_steps"], ["Did you mean"]),
    ("batch_eval_metrics", ["each batch"], ["Did you mean"]),
    ("auto_find_batch_size", ["gradient_accumulation_steps"], ["Did you mean"]),
    ("logging_strategy", ["Did you mean 'logging_steps'?", "epoch"], []),
    ("logging_first_step", ["logging_steps"], ["Did you mean"]),
    ("dataloader_drop_last", ["floor(rows / train_batch_size)"], ["Run `easytrain"]),
    ("torch_compile", ["jax.jit", "compiler_options"], ["Run `easytrain"]),
    ("torch_compile_mode", ["jax.jit"], ["Run `easytrain"]),
    ("use_cpu", ["JAX_PLATFORMS=cpu"], ["Run `easytrain"]),
    ("ignore_data_skip", ["where the checkpoint left it", "allow_data_order_change"], ["Run `easytrain"]),
    ("save_only_model", ["optimizer state", "final_model"], ["Run `easytrain"]),
    ("dataloader_num_workers", ["preprocessing_num_workers", "reader threads"], ["Did you mean"]),
    ("dataloader_prefetch_factor", ["four batches"], ["Did you mean"]),
    ("tf32", ["TF32", "JAX_DEFAULT_MATMUL_PRECISION"], ["Did you mean"]),
    ("bf16_full_eval", ["param_dtype"], []),
    ("average_tokens_across_devices", ["global batch"], ["Did you mean"]),
    ("label_smoothing_factor", ["compute_loss"], ["Did you mean"]),
    ("neftune_noise_alpha", ["NEFTune"], ["Did you mean"]),
    ("use_liger_kernel", ["loss_chunk_size"], []),
    ("include_num_input_tokens_seen", ["num_tokens", "not input tokens"], []),
    ("disable_tqdm", ["Did you mean 'disable_progress_bar: True'?"], []),
    ("run_name", ["WANDB_NAME", "output_dir"], []),
    ("project", ["WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"], []),
    ("trackio_space_id", ["Trackio", "wandb"], []),
    ("ddp_backend", ["coordinator_address"], ["Did you mean"]),
    ("ddp_find_unused_parameters", ["XLA"], ["Did you mean"]),
    ("length_column_name", ["packing", "bucket"], ["Did you mean"]),
    # one bucket, max_length, across processes (SFTTrainer.prepare_datasets)
    ("group_by_length", ["packing", "bucket", "multi-process run"], ["Did you mean"]),
    ("prediction_loss_only", ["eval_metrics"], []),
    ("save_on_each_node", ["shared", "output_dir"], []),
    ("full_determinism", ["seed", "xla_gpu_deterministic_ops"], []),
    ("do_predict", ["evaluate"], ["Did you mean"]),
])
def test_each_name_gets_what_easytrain_offers(name, present, absent):
    hint = unknown_name_hint(name, None, OURS, as_keys)
    assert all(text in hint for text in present) and not any(text in hint for text in absent), hint


def test_every_hint_names_real_fields_and_hooks():
    """A hint's settings are TrainingArguments fields (or a task's: `_with_task` leads with it), and the trainer
    methods a hint tells one to override exist with the arguments it names."""
    hooks = {f"{name}({', '.join(list(inspect.signature(method).parameters)[1:])})"
             for name, method in vars(BaseTrainer).items() if name.startswith("configure_")}
    for name, port in {**TRANSFORMERS_FIELDS, **OTHER_FIELDS}.items():
        settings = port(None).settings
        assert not settings or _with_task(settings, OURS), (name, settings)
        hint = unknown_name_hint(name, None, OURS, as_keys)
        for said in (word.strip("(),.;:'") for word in hint.split() if word.startswith("configure_")):
            assert any(hook.startswith(said) for hook in hooks), (name, said, hooks)
        assert "configure_" not in hint or any(hook in hint for hook in hooks), (name, hint)


def test_the_scheduler_and_optimizer_arguments_on_the_command_line_and_in_a_config_file(tmp_path, capsys):
    assert main(["train", "--lr_scheduler_kwargs", '{"num_cycles": 2}']) == 2
    err = capsys.readouterr().err
    assert "configure_schedule" in err and "Did you mean" not in err, err
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"optim_args": "momentum=0.9"}))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sgd_momentum" in err and "'optimizer'?" not in err, err
    assert as_flags((("process_id", None),)) in unknown_name_hint("local_rank", "0", OURS, as_flags)
