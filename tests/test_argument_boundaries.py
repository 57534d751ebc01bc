"""Every value refusal of `TrainingArguments` fires at its bound, names its field and the allowed values, and the
value just inside the bound is accepted: a refusal that silently stops firing lets values through that train on
nothing, to NaN, or (save_total_limit=0) delete every checkpoint."""

from __future__ import annotations

from typing import Any

import pytest

from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError

#: (field, refused value, accepted value, message fragment that names the fix, other fields both need)
BOUNDS: list[tuple[str, Any, Any, str, dict[str, Any]]] = [
    *[(name, 0, 1, "must be a positive integer", {}) for name in (
        "train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps",
        "eval_steps", "save_steps")],
    ("learning_rate", 0.0, 1e-9, "must be a positive number", {}),
    ("num_train_epochs", 0, 1, "or set max_steps > 0", {}),
    ("warmup_ratio", 1.01, 1.0, "must be in [0, 1]", {}),
    ("warmup_ratio", -0.01, 0.0, "must be in [0, 1]", {}),
    ("warmup_steps", -1, 0, "must be >= 0", {}),
    ("weight_decay", -0.1, 0.0, "must be >= 0", {}),
    ("max_grad_norm", -1.0, 0.0, "must be >= 0 (0 disables)", {}),
    ("validation_split_percentage", 100, 99, "must be in [0, 100)", {}),
    ("validation_split_percentage", -1, 0, "must be in [0, 100)", {}),
    ("save_total_limit", 0, 1, "unset keeps every checkpoint", {}),
    *[(name, 0, 1, "must be a positive size or -1", {}) for name in (
        "data_parallel_size", "fsdp_size", "tensor_parallel_size")],
    ("fsdp_size", -2, -1, "must be a positive size or -1", {}),
    ("lora_rank", -1, 0, "or 0 to train every weight", {}),
    ("loss_chunk_size", -1, 0, "or 0 to compute the full logits", {}),
    # eval_strategy='steps' (the default, spelled out): with 'no' another refusal names the same field.
    ("early_stopping_patience", 0, 1, "must be a positive integer or unset", {"eval_strategy": "steps"}),
    ("adam_beta1", 1.0, 0.999, "must be in [0, 1)", {}),
    ("adam_beta1", -0.1, 0.0, "must be in [0, 1)", {}),
    ("adam_beta2", 1.0, 0.999, "must be in [0, 1)", {}),
    ("adam_epsilon", 0.0, 1e-12, "must be a positive number", {}),
    ("sgd_momentum", 1.0, 0.99, "must be in [0, 1)", {}),
    ("seed", -1, 0, "must be an integer >= 0", {}),
    ("profile_steps", -1, 0, "or 0 for no trace", {}),
    ("profile_start_step", 0, 1, "must be a step number >= 1", {}),
    ("max_train_samples", 0, 1, "or unset (null) to use them all", {}),
    ("max_eval_samples", 0, 1, "or unset (null) to use them all", {}),
    ("preprocessing_num_workers", 0, 1, "or unset (null)", {}),
    ("num_processes", 0, 1, "or unset to auto-detect", {}),
    ("process_id", -1, 0, "must be >= 0", {}),
    ("process_id", 2, 1, "must be in [0, 2) for num_processes=2", {"num_processes": 2}),
    ("dtype", "float16", "bfloat16", "Use 'bfloat16'", {}),
    ("param_dtype", "float64", "float32", "must be one of float32, bfloat16", {}),
    ("non_finite_policy", "raise", "stop", "must be one of skip, stop, ignore", {}),
    ("save_strategy", "always", "epoch", "must be one of no, steps, epoch", {}),
    ("remat_policy", "some", "dots", "must be 'none', 'full' or 'dots'", {}),
    ("attention_implementation", "flash", "xla", "must be one of", {}),
    ("lora_export", "all", "both", "must be 'adapter', 'merged' or 'both'", {}),
    ("eval_metrics", ["acc"], ["accuracy"], "choose from", {}),
    ("load_best_model_at_end", True, False, "needs metric_for_best_model", {}),
]


@pytest.mark.parametrize("field, refused, accepted, fix, others", BOUNDS,
                         ids=[f"{b[0]}={b[1]!r}" for b in BOUNDS])
def test_each_refusal_fires_at_its_bound_and_accepts_the_value_inside(field, refused, accepted, fix, others):
    with pytest.raises(ArgumentError) as refusal:
        TrainingArguments(**others, **{field: refused})
    assert refusal.value.field == field
    assert fix in refusal.value.message, refusal.value.message
    assert getattr(TrainingArguments(**others, **{field: accepted}), field) == accepted
