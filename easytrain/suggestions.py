"""The "did you mean" of every unknown name (arguments, config keys, tasks): one rule, so all typos read alike.

Before the spelling match, the names transformers.Trainer gives what easytrain names otherwise or lacks
(`TRANSFORMERS_FIELDS`, with `easytrain.transformers_unported.UNTAKEN`):
spelling alone would point elsewhere, sometimes somewhere that trains differently (`gradient_checkpointing` reads
closest to `async_checkpointing`, `eval_accumulation_steps` to `gradient_accumulation_steps`, `data_seed` to
`dataset_name`), and some mean a setting only with their value (`optim sgd` is `optimizer sgd` with momentum 0).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from easytrain.transformers_unported import UNTAKEN, Ported, Settings, fixed, switch

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
    "gradient_checkpointing": switch("remat_policy", _REMAT_FULL, "none"),
    "activation_checkpointing": switch("remat_policy", _REMAT_FULL, "none"),
    "gradient_checkpointing_kwargs": lambda value: _REMAT_OPTIONS,
    "activation_checkpointing_kwargs": lambda value: _REMAT_OPTIONS,
    "bf16": switch("dtype", Ported((("dtype", "bfloat16"),), (
        "It computes activations in bfloat16; parameters and optimizer state keep param_dtype (float32 unless set)")),
        "float32"),
    "fp16": switch("dtype", Ported((("dtype", "bfloat16"),), (
        "The Trainer's fp16 relies on loss scaling (a gradient scaler), which easytrain does not do, so float16 is "
        "refused here; bfloat16 has float32's exponent range and needs none")), "float32"),
    "eval_accumulation_steps": lambda value: Ported((), (
        "There is no such setting here, and none is needed: evaluation merges each batch's metric sums and counts on "
        "the device and fetches them once, so no logits or predictions pile up on the device or the host "
        "(gradient_accumulation_steps is another thing: it splits training batches)")),
    **UNTAKEN,
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
    "logging_dir": fixed("There is no such setting here: logs go under output_dir (tensorboard/, metrics.jsonl)"),
    "save_safetensors": fixed("There is no such setting here: exports are always safetensors, and checkpoints "
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
