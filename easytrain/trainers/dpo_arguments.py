"""`DPOArguments`: the preference-optimisation options (`easytrain train --task dpo` flags), checked when made.

They are refused at construction with the field named, before any data or model work: unknown losses, a weight per
loss, the ranges of beta and label smoothing, and TR-DPO's options (a moving reference cannot be precomputed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from easytrain.errors import ArgumentError
from easytrain.preference import PREFERENCE_LOSSES, REFERENCE_FREE


def _help(text: str, default: Any = None, **kwargs: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text, **kwargs})
    return field(default=default, metadata={"help": text, **kwargs})


@dataclass
class DPOArguments:
    """Preference-optimisation options (`easytrain train --task dpo --help` lists them)."""

    beta: float = _help("Strength of the KL-style tie to the reference (the inverse temperature).", 0.1)
    loss_type: list[str] = _help("One loss or several, summed with loss_weights: "
                                 + ", ".join(PREFERENCE_LOSSES) + ".", ["sigmoid"])
    loss_weights: Optional[list[float]] = _help("A weight per loss_type entry (default 1 each).")
    label_smoothing: float = _help("Label noise for sigmoid (cDPO) and robust, in [0, 0.5).", 0.0)
    simpo_gamma: float = _help("Target reward margin of simpo.", 0.5)
    max_prompt_length: Optional[int] = _help("Cut prompts to their last N tokens (default: only as needed).")
    ref_model_name_or_path: Optional[str] = _help("Reference model (default: a frozen copy of the initial policy).")
    precompute_ref_log_probs: bool = _help("Compute reference log-probs in one pass before training, cache "
                                           "them in output_dir, and keep no reference model in memory.", False)
    sync_ref_model: bool = _help("TR-DPO: move the reference toward the policy every ref_model_sync_steps.", False)
    ref_model_mixup_alpha: float = _help("TR-DPO: reference <- alpha * policy + (1 - alpha) * reference.", 0.6)
    ref_model_sync_steps: int = _help("TR-DPO: optimizer steps between reference updates.", 512)
    logps_chunk_size: int = _help("Vocabulary entries per chunk of the float32 log-prob computation.", 4096)

    def __post_init__(self) -> None:
        unknown = [name for name in self.loss_type if name not in PREFERENCE_LOSSES]
        checks = [
            (not self.loss_type or unknown, "loss_type", f"unknown loss(es) {unknown}; choose from "
                                                         f"{', '.join(PREFERENCE_LOSSES)}."),
            (self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type), "loss_weights",
             f"needs one weight per loss_type entry ({len(self.loss_type)})."),
            (self.beta <= 0, "beta", f"must be positive, got {self.beta}."),
            (not 0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)."),
            (self.sync_ref_model and self.precompute_ref_log_probs, "sync_ref_model",
             "a moving reference cannot be precomputed; drop one of sync_ref_model, precompute_ref_log_probs."),
            (not 0 < self.ref_model_mixup_alpha <= 1 or self.ref_model_sync_steps < 1, "ref_model_mixup_alpha",
             "needs 0 < ref_model_mixup_alpha <= 1 and ref_model_sync_steps >= 1."),
        ]
        for failed, name, message in checks:
            if failed:
                raise ArgumentError(name, message)

    @property
    def needs_reference(self) -> bool:
        return not set(self.loss_type) <= REFERENCE_FREE
