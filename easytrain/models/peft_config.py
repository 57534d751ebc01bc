"""Reading a PEFT ``adapter_config.json`` into easytrain's ``LoRAConfig``, refusing what would load wrongly.

An adapter easytrain cannot reproduce (DoRA, per-layer ranks, an initialisation that rewrote the base weights,
modules easytrain does not train) would load without error and give other outputs than PEFT's, so each such
field is refused by name, with the conversion PEFT offers. A field easytrain does not know (a LoRA variant of a
newer PEFT) is refused too when it is set, since it may change the outputs as well; left off, it loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from easytrain import lora
from easytrain.lora import LoRAConfig
from easytrain.models.hf_io import CheckpointError, read_json_object

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# adapter_config.json fields whose non-default values change what the adapter computes and that easytrain
# does not implement: loading such an adapter would silently give other outputs (or fail later on weight names
# that say nothing of the cause), so it is refused by name before any weight is read.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "layer_replication": (None,),
    "exclude_modules": (None, [], ""),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "enable_lora": (None,),  # early PEFT's merged-qkv LoRA
}

#: Fields easytrain reads or that do not change what the adapter computes, with the reason.
ACCEPTED_FIELDS = {
    **dict.fromkeys(("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                     "revision", "inference_mode"), "metadata"),
    **dict.fromkeys(("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "modules_to_save",
                     "init_lora_weights"), "read into LoRAConfig (or refused by value below)"),
    "ensure_weight_tying": "checked against the model's tied embeddings when the adapter loads",
    "layers_pattern": "only used with layers_to_transform, which is refused",
    "qalora_group_size": "only used with use_qalora, which is refused",
    **dict.fromkeys(("loftq_config", "eva_config", "corda_config", "lora_ga_config"),
                    "settings of an initialisation, judged by init_lora_weights"),
    **dict.fromkeys(("megatron_config", "megatron_core"), "how PEFT built its layers for Megatron; same LoRA math"),
    "runtime_config": "runtime options, not saved",
}


def _check_fields(path: Path, raw: dict[str, Any]) -> None:
    """Refuse each known unsupported field set off its default, and each field easytrain does not know that is set
    at all: a LoRA variant added to a newer PEFT would otherwise load as plain LoRA and compute something else."""
    merge = ("merge this adapter with PEFT (merge_and_unload), save the merged model and load it with "
             "easytrain.models.from_pretrained instead.")
    for field, value in raw.items():
        if field in _UNSUPPORTED and value not in _UNSUPPORTED[field]:
            allowed = _UNSUPPORTED[field][0]
            raise CheckpointError(f"{path}: {field}={value!r} is not supported by easytrain's LoRA (only "
                                  f"{allowed!r}); {merge}")
        if field not in _UNSUPPORTED and field not in ACCEPTED_FIELDS and value not in (None, False, {}, [], "", 0):
            raise CheckpointError(f"{path}: {field}={value!r} is a PEFT LoRA option easytrain does not know "
                                  f"(adapter written by peft {raw.get('peft_version', '?')}); it may change what "
                                  "the adapter computes, so it is refused. If that PEFT version documents it as not "
                                  f"changing the LoRA outputs, delete it from {ADAPTER_CONFIG_NAME}; otherwise {merge}")


#: ``init_lora_weights`` values that leave the base weights as they are: only how A and B started differs, and
#: the file holds their trained values, so the adapter is plain LoRA on the original checkpoint.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _check_init(path: Path, init: Any) -> None:
    """Refuse initialisations after which the adapter does not mean ``W + scaling * B @ A`` on the original ``W``."""
    if init in _PLAIN_INITS:
        return
    if isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda", "lora_ga")):
        why = ("rewrites the base weights when PEFT makes the adapter (the initial adapter is subtracted from them), "
               "so the adapter gives its trained outputs only on that modified base, not on the original checkpoint "
               "easytrain loads. Convert it in PEFT to a plain LoRA adapter of rank 2r: before training, set "
               "peft_model.peft_config['default'].init_lora_weights = True and save_pretrained(initial_dir); after "
               "training, save_pretrained(out_dir, path_initial_model_for_weight_conversion=initial_dir) and load "
               "out_dir. Or")
    elif init == "loftq":
        why = "quantises the base weights and fits the adapter to that quantised base, which easytrain does not load;"
    elif init == "mica":
        why = "is PEFT's MiCA variant, which keeps lora_B frozen while training (easytrain would train it);"
    else:
        why = ("is not one easytrain knows to leave the base weights unchanged (it loads true, false, 'gaussian', "
               "'orthogonal' and 'eva');")
    raise CheckpointError(f"{path}: init_lora_weights={init!r} {why} merge it in PEFT (merge_and_unload()), save the "
                          "merged model and load that with easytrain.models.from_pretrained.")


def read_peft_config(directory: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Any]]:
    """The ``LoRAConfig`` an adapter directory describes, and its raw ``adapter_config.json``.

    Raises:
        CheckpointError: Not a LoRA adapter, or one using a PEFT feature easytrain does not implement, or made
            with an ``init_lora_weights`` that rewrites the base weights (PiSSA, OLoRA, ...): the message names the
            field. (``load_peft_adapter`` also refuses a ``modules_to_save`` narrower than what the config trains.)
    """
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a PEFT adapter directory holds {ADAPTER_CONFIG_NAME} and "
                              f"{ADAPTER_WEIGHTS_NAME}.")
    raw = read_json_object(path)
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type={raw.get('peft_type')!r}; only LoRA adapters (\"LORA\") load.")
    _check_fields(path, raw)
    modules_to_save = [str(m).rsplit(".", 1)[-1] for m in raw.get("modules_to_save") or []]
    if other := sorted(m for m in modules_to_save if m not in ("embed_tokens", "lm_head") and not m.endswith("norm")):
        raise CheckpointError(f"{path}: modules_to_save={raw['modules_to_save']!r} names {other}; easytrain "
                              "trains whole embeddings (embed_tokens, lm_head) and norms only. Merge this adapter "
                              "with PEFT (merge_and_unload) and load the merged model instead.")
    init = raw.get("init_lora_weights", True)
    _check_init(path, init)
    try:
        config = LoRAConfig(
            rank=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
            target_modules=raw.get("target_modules") or (),
            train_embeddings=any(m in ("embed_tokens", "lm_head") for m in modules_to_save),
            train_norms=any("norm" in m for m in modules_to_save),
            use_rslora=bool(raw.get("use_rslora", False)),
            init_a="gaussian" if init == "gaussian" else "kaiming_uniform", strict_targets=False)  # as PEFT
    except lora.LoRAConfigError as error:
        raise CheckpointError(f"{path}: {error}") from error
    return config, raw
