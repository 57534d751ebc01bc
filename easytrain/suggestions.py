"""The "did you mean" of every unknown name (arguments, config keys, tasks): one rule, so all typos read alike.

Before the spelling match, the names transformers.Trainer gives what easytrain names otherwise (`TRANSFORMERS_FIELDS`):
spelling alone would point elsewhere, sometimes somewhere that trains differently (`gradient_checkpointing` reads
closest to `async_checkpointing`, `eval_accumulation_steps` to `gradient_accumulation_steps`, `data_seed` to
`dataset_name`), and some mean a setting only with their value (`optim sgd` is `optimizer sgd` with momentum 0).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: (field, value) pairs to write; a value of None: the field alone (its value is the user's to choose).
Settings = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Ported:
    """A transformers setting as easytrain spells it: `settings` (none: easytrain has no equivalent) and `why`, how
    the two differ or why none is needed."""

    settings: Settings
    why: str


def _on(value: Any) -> bool:
    """A transformers boolean as given: a bare flag (None) or anything but transformers' false strings is on."""
    return value is not False and str(value).strip().lower() not in ("false", "f", "no", "n", "0", "off")


def _switch(name: str, on: Ported, default: Any) -> Callable[[Any], Ported]:
    """A transformers boolean: `on` when it is set, else `name` at its default (nothing to write)."""
    return lambda value: on if _on(value) else Ported(((name, default),), "It is the default: leave it out")


_ADAMW = Ported((("optimizer", "adamw"),), "The same AdamW (adam_beta1, adam_beta2, adam_epsilon, decoupled weight "
                                           "decay)")
_LION = Ported((("optimizer", "lion"),), "The Trainer's Lion (bitsandbytes) takes adam_beta1 and adam_beta2 as its "
                                         "betas, as this one does")
#: transformers' `optim` values that easytrain has: the settings that give the same update, and what differs.
TRANSFORMERS_OPTIMIZERS: Mapping[str, Ported] = {
    **dict.fromkeys(("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused"), _ADAMW),
    "sgd": Ported((("optimizer", "sgd"), ("sgd_momentum", 0)),
                  "The Trainer's sgd is torch.optim.SGD without momentum (unless optim_args sets one); sgd_momentum "
                  "defaults to 0.9 here"),
    "adafactor": Ported((("optimizer", "adafactor"),),
                        "Not the same update: the Trainer's Adafactor (scale_parameter=False, relative_step=False) "
                        "takes learning_rate as an absolute step and factors every matrix; easytrain's scales each "
                        "update by the parameter's RMS and factors only arrays whose two longest axes are >= 128, so "
                        "the same learning_rate is another step (see --optimizer's help)"),
    **dict.fromkeys(("lion_32bit", "paged_lion_32bit"), _LION),
}


def _optim(value: Any) -> Ported:
    if (ported := TRANSFORMERS_OPTIMIZERS.get(str(value))) is not None:
        return ported
    from easytrain.argument_values import OPTIMIZERS  # that module imports this one

    return Ported((("optimizer", None),), f"The optimizers here are {', '.join(OPTIMIZERS)}; for another, override "
                                          "configure_optimizer(schedule) in a trainer (docs/custom_trainer.md)")


def _fixed(why: str) -> Callable[[Any], Ported]:
    """A setting easytrain has no field for, whatever its value: the why alone (no "Did you mean")."""
    return lambda value: Ported((), why)


def _pointing(field: str, why: str) -> Callable[[Any], Ported]:
    """A setting whose nearest easytrain field is `field` (the user's to set), whatever its value."""
    return lambda value: Ported(((field, None),), why)


_CUSTOM = "in a trainer (docs/custom_trainer.md)"
_MESH = ("There is no such setting here: a run is placed on a device mesh of data_parallel_size x fsdp_size x "
         "tensor_parallel_size devices, fsdp_size sharding parameters and optimizer state (docs/scaling.md)")
_HUB = ("There is no pushing to the Hub here: save_pretrained_at_end exports output_dir/final_model (config.json "
        "and safetensors), which `hf upload` pushes")
#: transformers.TrainingArguments fields whose spelling alone would point to a look-alike that does something else.
_UNTAKEN: Mapping[str, Callable[[Any], Ported]] = {
    "lr_scheduler_kwargs": _fixed(
        "There is no such setting here: the schedules ('constant', 'linear', 'cosine') take no arguments besides "
        "warmup_steps or warmup_ratio; 'cosine' is cosine_with_restarts at num_cycles=1, 'linear' polynomial at "
        f"power=1.0 (down to 0, not lr_end); for another schedule, override configure_schedule(total_steps) {_CUSTOM}"),
    "optim_args": _fixed(
        "There is no such setting here: each optimizer setting is a field of its own: adam_beta1, adam_beta2 and "
        "adam_epsilon (adamw; lion reads the betas), sgd_momentum (sgd), weight_decay and max_grad_norm (all "
        "four); adafactor's others are optax's defaults. For other options, override "
        f"configure_optimizer(schedule) {_CUSTOM}"),
    "optim_target_modules": _fixed(
        "There is no such setting here: it chooses the modules transformers' GaLore and APOLLO optimizers update, "
        "which easytrain does not have (lora_target_modules chooses where LoRA adapters go: another thing)"),
    "auto_find_batch_size": _fixed(
        "There is no such setting here: train_batch_size is used as given, never lowered after running out of "
        "memory; gradient_accumulation_steps splits it into micro-batches, which need less memory"),
    "logging_strategy": _pointing("logging_steps", (
        "Logging is by updates only: every logging_steps updates (transformers' 'steps'), a checkpoint and the last "
        "update also ending a logging window; there is no 'epoch' logging")),
    "logging_first_step": _fixed(
        "There is no such setting here: records come every logging_steps updates, at each checkpoint and at the last "
        "update (logging_steps 1 logs the first update by itself)"),
    "eval_delay": _fixed("There is no such setting here: evaluation follows eval_strategy from the start (every "
                         "eval_steps updates, or every epoch)"),
    "eval_on_start": _fixed("There is no such setting here: the first evaluation comes after eval_steps updates "
                            "(eval_strategy 'steps') or at the first epoch's end ('epoch')"),
    "batch_eval_metrics": _fixed(
        "There is no such setting here, and none is needed: the eval_metrics of the loss (accuracy, perplexity) "
        "merge each batch's sums and counts on the device, never computed from every prediction gathered at once"),
    "enable_jit_checkpoint": _fixed(
        "There is no such setting here, and none is needed: a SIGTERM (or SIGINT) during training always ends "
        "the run after the current step with a checkpoint, whatever save_strategy, exit status 75 "
        "(docs/checkpoints.md)"),
    "restore_callback_states_from_checkpoint": _fixed(
        "There is no such setting here: a resume always gives each callback its state_dict back "
        "(docs/api/callbacks.md)"),
    **dict.fromkeys(("push_to_hub", "hub_strategy", "hub_model_id", "hub_token", "hub_private_repo",
                     "hub_always_push", "hub_revision"), _fixed(_HUB)),
    **dict.fromkeys(("accelerator_config", "parallelism_config", "fsdp_config", "deepspeed"), _fixed(_MESH)),
    "fsdp": _pointing("fsdp_size", (
        "transformers' fsdp takes FSDP's options ('full_shard', 'offload', ...); fsdp_size here is the number of "
        "devices parameters and optimizer state are sharded over (-1: those the other mesh axes leave; "
        "docs/scaling.md)")),
    "label_names": _fixed("There is no such setting here: each task makes its own targets from its rows "
                          "(docs/tasks.md)"),
    "train_sampling_strategy": _fixed(
        "There is no such setting here: the training rows are shuffled anew every epoch, from seed (transformers' "
        "'random'); there is no 'sequential' or 'group_by_length'"),
    "dataloader_drop_last": _fixed(
        "There is no such setting here: an epoch is floor(rows / train_batch_size) updates of full batches, as with "
        "transformers' dataloader_drop_last true; the rows left over are other ones in each epoch, shuffled anew "
        "(docs/porting.md)"),
    **dict.fromkeys(("torch_compile", "torch_compile_backend", "torch_compile_mode"), _fixed(
        "There is no such setting here, and none is needed: the train and eval steps are always compiled by XLA "
        "(jax.jit); compiler_options passes XLA's own options")),
    "use_cpu": _fixed("There is no such setting here: JAX runs on the accelerator it finds; JAX_PLATFORMS=cpu in the "
                      "environment runs on the CPU"),
    "ignore_data_skip": _fixed(
        "There is no such setting here: a resume continues the data where the checkpoint left it (with "
        "allow_data_order_change, in the order changed data settings give)"),
    "save_only_model": _fixed(
        "There is no such setting here: checkpoints always hold the optimizer state and the data position, for an "
        "exact resume; save_pretrained_at_end exports the model alone to output_dir/final_model"),
    "local_rank": _pointing("process_id", (
        "A multi-process run (one process per host) is set up by coordinator_address, num_processes and "
        "process_id; SLURM and Cloud TPU launches are detected without them")),
}

_REMAT_FULL = Ported((("remat_policy", "full"),),
                     "It recomputes each decoder layer's activations from the layer's input in the backward pass, as "
                     "transformers' activation checkpointing of every layer does ('dots' also keeps matmul outputs)")
_REMAT_OPTIONS = Ported((("remat_policy", None),),
                        "There are no checkpointing options (every_n_layers, offload) here: remat_policy "
                        "'full' recomputes every decoder layer, 'dots' keeps the matmul outputs too")
#: transformers.TrainingArguments fields easytrain names otherwise or lacks: their value -> what to write here.
TRANSFORMERS_FIELDS: Mapping[str, Callable[[Any], Ported]] = {
    "data_seed": lambda value: Ported((("seed", None),), (
        "The Trainer's data_seed seeds the data order alone; seed here seeds the initial weights, the data order "
        "and the held-out validation split together (see seed's help and docs/porting.md)")),
    "optim": _optim,
    "gradient_checkpointing": _switch("remat_policy", _REMAT_FULL, "none"),
    "activation_checkpointing": _switch("remat_policy", _REMAT_FULL, "none"),
    "gradient_checkpointing_kwargs": lambda value: _REMAT_OPTIONS,
    "activation_checkpointing_kwargs": lambda value: _REMAT_OPTIONS,
    "bf16": _switch("dtype", Ported((("dtype", "bfloat16"),), (
        "It computes activations in bfloat16; parameters and optimizer state keep param_dtype (float32 unless set)")),
        "float32"),
    "fp16": _switch("dtype", Ported((("dtype", "bfloat16"),), (
        "The Trainer's fp16 relies on loss scaling (a gradient scaler), which easytrain does not do, so float16 is "
        "refused here; bfloat16 has float32's exponent range and needs none")), "float32"),
    "eval_accumulation_steps": lambda value: Ported((), (
        "There is no such setting here, and none is needed: evaluation merges each batch's metric sums and counts on "
        "the device and fetches them once, so no logits or predictions pile up on the device or the host "
        "(gradient_accumulation_steps is another thing: it splits training batches)")),
    **_UNTAKEN,
}


def _global_batch(field: str, per_device: str) -> Callable[[Any], Ported]:
    return lambda value: Ported(((field, None),), (
        f"{field} here is the global batch, summed over devices, hosts (and gradient_accumulation_steps for training): "
        f"the Trainer's {per_device} times the number of devices (times its accumulation) gives the same batch"))


def _rpo(value: Any) -> Ported:
    return Ported((("loss_type", "sigmoid sft"), ("loss_weights", None if value is None else f"1 {value}")), (
        "TRL's RPO adds rpo_alpha times the chosen completion's per-token NLL to the sigmoid loss: that NLL is the "
        "'sft' loss here, weighted by loss_weights (averaged per pair, where TRL averages over a micro-batch's "
        "chosen tokens: docs/dpo.md)"))


#: TRL's and common names that spelling would point to a look-alike that does something else (`dataset_text_field`
#: to `dataset_name`, `max_completion_length` to `max_prompt_length`, `batch_size` to `eval_batch_size`).
OTHER_FIELDS: Mapping[str, Callable[[Any], Ported]] = {
    "per_device_train_batch_size": _global_batch("train_batch_size", "per_device_train_batch_size"),
    "per_device_eval_batch_size": _global_batch("eval_batch_size", "per_device_eval_batch_size"),
    "batch_size": _global_batch("train_batch_size", "per-device batch size"),
    "max_completion_length": lambda value: Ported((("max_length", None),), (
        "TRL's max_completion_length caps the completion alone; max_length here caps prompt + completion, and "
        "max_prompt_length the prompt (docs/dpo.md)")),
    "dataset_text_field": lambda value: Ported((("text_column", value),), "TRL's dataset_text_field is the column "
                                                                          "of plain text: text_column here"),
    "dataset_num_proc": lambda value: Ported((("preprocessing_num_workers", value),), (
        "The processes that tokenise the dataset: preprocessing_num_workers here")),
    "ref_model": lambda value: Ported((("ref_model_name_or_path", value),), (
        "The reference model's directory or hub id: ref_model_name_or_path here (unset: a frozen copy of the "
        "initial policy)")),
    "rpo_alpha": _rpo,
    "logging_dir": _fixed("There is no such setting here: logs go under output_dir (tensorboard/, metrics.jsonl)"),
    "save_safetensors": _fixed("There is no such setting here: exports are always safetensors, and checkpoints "
                               "Orbax's"),
    "lr": lambda value: Ported((("learning_rate", value),), "The peak learning rate is learning_rate"),
    "epochs": lambda value: Ported((("num_train_epochs", value),), "Passes over the training set: num_train_epochs"),
}


@functools.cache
def known_as() -> Mapping[str, str]:
    """The easytrain field each name of `TRANSFORMERS_FIELDS` points to, for `closest` (a bare name, no value);
    built at first use, since `_optim` imports `argument_values`, which imports this module."""
    bare = {name: port(None) for name, port in {**TRANSFORMERS_FIELDS, **OTHER_FIELDS}.items()}
    return {name: ported.settings[0][0] for name, ported in bare.items() if ported.settings}


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice `name` most likely means: its easytrain name when `known_as` holds one, else the choice it most
    likely misspells, or None when none is close (difflib's ratio >= 0.6)."""
    choices = list(choices)
    if (known := known_as().get(str(name))) in choices:
        return known
    matches = difflib.get_close_matches(str(name), choices, n=1)
    return matches[0] if matches else None


def as_flags(settings: Settings) -> str:
    """`--optimizer sgd --sgd_momentum 0`: settings as a command line gives them."""
    return " ".join(f"--{name}" if value is None else f"--{name} {value}" for name, value in settings)


def as_keys(settings: Settings) -> str:
    """`'optimizer: sgd', 'sgd_momentum: 0'`: settings as a config file (or a dict) holds them."""
    return ", ".join(f"'{name}'" if value is None else f"'{name}: {value}'" for name, value in settings)


def as_keywords(settings: Settings) -> str:
    """`optimizer='sgd', sgd_momentum=0`: settings as Python passes them."""
    return ", ".join(name if value is None else f"{name}={value!r}" for name, value in settings)


def unknown_name_hint(name: str, value: Any, known: Collection[str], spell: Callable[[Settings], str],
                      listing: str = "easytrain train") -> str:
    """The sentence after the refusal of an unknown `name` given `value` (None: a bare flag): a transformers setting
    as easytrain spells it (`spell`: `as_flags` or `as_keys`) and how the two differ; else the known name it most
    likely misspells; else where the list is (`listing --help`: the command, or a script of one's own)."""
    port = TRANSFORMERS_FIELDS.get(name) or OTHER_FIELDS.get(name)
    ported = port(value) if port is not None else None
    if ported is not None:
        settings = _with_task(ported.settings, known)
        return (f"Did you mean {spell(settings)}? " if settings else "") + f"{ported.why}."
    close = closest(name, known)
    return f"Did you mean {spell(((close, None),))}?" if close else f"Run `{listing} --help` for the list."


def _with_task(settings: Settings, known: Collection[str]) -> Settings:
    """`settings` where `known` has their fields; else led by the task whose arguments have them all (TRL's rpo_alpha
    given to task sft: `--task dpo --loss_type ...`, not the look-alike `--lora_alpha`); else none (the why alone)."""
    missing = {field for field, _ in settings} - set(known)
    if not missing:
        return settings
    from easytrain.tasks.registry import tasks_declaring  # here: read on this error only (it loads every task)

    owners = [task for task in tasks_declaring(min(missing), besides="")
              if all(task in tasks_declaring(field, besides="") for field in missing)]
    return (("task", owners[0]), *settings) if owners else ()
