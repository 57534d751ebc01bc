"""Checks that a checkpoint can continue this run unchanged, before anything is restored."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from easytrain.errors import ArgumentError

if TYPE_CHECKING:
    from easytrain.trainers.base import BaseTrainer

# Changing any of these would silently change which examples a resumed run sees, or in what order.
DATA_ORDER_FIELDS = ("seed", "train_batch_size", "dataset_name", "dataset_config_name", "train_file",
                     "max_length", "text_column", "max_train_samples", "validation_split_percentage")
# Architecture keys compared between the checkpoint and the model about to be trained.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def _differences(stored: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"{key}: checkpoint {stored.get(key)!r} vs now {current.get(key)!r}"
            for key in keys if stored.get(key) != current.get(key)]


def config_dict(config: Any) -> dict[str, Any] | None:
    """A Hugging Face config as plain JSON values (None for models without one)."""
    return json.loads(config.to_json_string()) if hasattr(config, "to_json_string") else None


def check_resumable(run_info: dict[str, Any], trainer: "BaseTrainer") -> None:
    """Refuse a resume whose model or data order differs from the checkpoint's."""
    stored_config = run_info.get("model_config") or {}
    current_config = config_dict(trainer.model_config) or {}
    if stored_config and current_config:
        diffs = _differences(stored_config, current_config, ARCHITECTURE_KEYS)
        if diffs:
            raise ArgumentError("model_config", "the checkpoint was trained with a different architecture ("
                                + "; ".join(diffs) + "). Resume with the same model, or start a new output_dir.")
    stored_args = run_info.get("arguments") or {}
    diffs = _differences(stored_args, trainer.arguments.to_dict(), DATA_ORDER_FIELDS)
    if diffs:
        raise ArgumentError("resume_from_checkpoint", "these arguments changed since the checkpoint and would "
                            "alter the resumed run's data order (" + "; ".join(diffs) + "). Restore their values "
                            "or start a new output_dir.")
