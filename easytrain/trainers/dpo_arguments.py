"""`DPOArguments`: the preference-optimisation options (`easytrain train --task dpo` flags), checked when made.

They are refused at construction with the field named, before any data or model work: a value of another type, NaN or
infinity in any number, an empty path ('' is not unset), unknown losses, a weight per loss, the ranges of beta, label
smoothing and the chunk and prompt lengths, TR-DPO's options (a moving reference cannot be precomputed), and an
option no chosen loss reads (a reference for reference-free losses, label smoothing for losses without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from easytrain import argument_checks
from easytrain.data.chat_templates import read_chat_template
from easytrain.errors import ArgumentError
from easytrain.preference import PREFERENCE_LOSSES, gamma_readers, label_smoothing_readers, reference_free_losses


def _in_order(names: frozenset[str]) -> list[str]:
    return [name for name in PREFERENCE_LOSSES if name in names]


def _help(text: str, default: Any = None, **kwargs: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text, **kwargs})
    return field(default=default, metadata={"help": text, **kwargs})


def _weight_checks(weights: list[float] | None) -> list[tuple[bool, str, str]]:
    """A negative weight maximises its loss, and with no positive weight nothing trains."""
    if weights is None:
        return []
    return [(any(w < 0 for w in weights), "loss_weights", f"must each be >= 0, got {weights}: a negative weight "
                                                          "maximises its loss."),
            (not any(w > 0 for w in weights), "loss_weights", f"needs a positive weight, got {weights}: with none, "
                                                              "nothing trains.")]


@dataclass
class DPOArguments:
    """Preference-optimisation options (`easytrain train --task dpo --help` lists them)."""

    beta: float = _help("Strength of the KL-style tie to the reference (the inverse temperature).", 0.1)
    loss_type: list[str] = _help("One loss or several, summed with loss_weights: "
                                 + ", ".join(PREFERENCE_LOSSES) + ".", ["sigmoid"])
    loss_weights: Optional[list[float]] = _help("A weight per loss_type entry (default 1 each).")
    label_smoothing: float = _help("Label noise in [0, 0.5), read by " + ", ".join(_in_order(label_smoothing_readers()))
                                   + " only (sigmoid: cDPO).", 0.0)
    simpo_gamma: float = _help("Target reward margin of simpo.", 0.5)
    max_prompt_length: Optional[int] = _help("Cut prompts to their last N tokens (default: only as needed).")
    ref_model_name_or_path: Optional[str] = _help("Reference model (default: a frozen copy of the initial policy).")
    precompute_ref_log_probs: bool = _help("Compute reference log-probs in one pass before training, cache "
                                           "them in output_dir, and keep no reference model in memory.", False)
    sync_ref_model: bool = _help("TR-DPO: move the reference toward the policy every ref_model_sync_steps.", False)
    ref_model_mixup_alpha: float = _help("TR-DPO: reference <- alpha * policy + (1 - alpha) * reference.", 0.6)
    ref_model_sync_steps: int = _help("TR-DPO: optimizer steps between reference updates.", 512)
    logps_chunk_size: int = _help("Vocabulary entries per chunk of the float32 log-prob computation.", 4096)
    disable_dropout: bool = _help("Run the policy without dropout in the loss (e.g. lora_dropout), as the "
                                  "reference runs: a dropped-out policy biases the margin.", True)
    chat_template_path: Optional[str] = _help("A Jinja chat template file that replaces the tokenizer's own (chat "
                                              "pairs, as in SFT).")

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):  # one name, as TRL takes it (not read letter by letter)
            self.loss_type = [self.loss_type]
        # Types first, and no NaN or infinity in any number (a NaN beta skipped every update and exited 0).
        argument_checks.normalize(self, DPOArguments)
        argument_checks.check_types(self, DPOArguments)
        argument_checks.check_not_blank(self, DPOArguments)
        unknown = [name for name in self.loss_type if name not in PREFERENCE_LOSSES]
        checks = [
            (not self.loss_type or unknown, "loss_type", f"unknown loss(es) {unknown}; choose from "
                                                         f"{', '.join(PREFERENCE_LOSSES)}."),
            (self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type), "loss_weights",
             f"needs one weight per loss_type entry ({len(self.loss_type)})."),
            (self.beta <= 0, "beta", f"must be positive (e.g. 0.1), got {self.beta}."),
            (not 0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)."),
            (self.max_prompt_length is not None and self.max_prompt_length < 1, "max_prompt_length",
             f"must be a number of tokens >= 1, or unset (none) to cut prompts only as needed; got "
             f"{self.max_prompt_length}."),
            (self.logps_chunk_size < 1, "logps_chunk_size",
             f"must be a number of vocabulary entries >= 1 (e.g. 4096), got {self.logps_chunk_size}."),
            (self.sync_ref_model and self.precompute_ref_log_probs, "sync_ref_model",
             "a moving reference cannot be precomputed; drop one of sync_ref_model, precompute_ref_log_probs."),
            (not 0 < self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha",
             f"must be in (0, 1] (1 copies the policy), got {self.ref_model_mixup_alpha}."),
            (self.ref_model_sync_steps < 1, "ref_model_sync_steps",
             f"must be a number of optimizer steps >= 1, got {self.ref_model_sync_steps}."),
            (len(set(self.loss_type)) < len(self.loss_type), "loss_type",
             f"names a loss twice ({self.loss_type}), which weighs it twice; name each once and weigh them with "
             "loss_weights."),
            *_weight_checks(self.loss_weights),
        ]
        for failed, name, message in checks + self._unread_options():
            if failed:
                raise ArgumentError(name, message)
        if self.chat_template_path:  # a missing file or a Jinja syntax error: before any data work
            read_chat_template(self.chat_template_path)

    def _unread_options(self) -> list[tuple[bool, str, str]]:
        """Options set that no chosen loss reads: they would change nothing, silently (or crash later)."""
        chosen = ", ".join(self.loss_type)
        reference = [(bool(getattr(self, name)) and not self.needs_reference, name,
                      f"the chosen losses ({chosen}) read no reference; drop {name}, or add a loss that reads one "
                      f"(any but {', '.join(_in_order(reference_free_losses()))}).")
                     for name in ("ref_model_name_or_path", "precompute_ref_log_probs", "sync_ref_model")]
        readers = label_smoothing_readers()
        smoothing = (self.label_smoothing != 0 and not readers & set(self.loss_type), "label_smoothing",
                     f"only {', '.join(_in_order(readers))} read it, not the chosen losses ({chosen}); drop "
                     "label_smoothing, or add one of those losses.")
        gamma = (self.simpo_gamma != _DEFAULTS["simpo_gamma"] and not gamma_readers() & set(self.loss_type),
                 "simpo_gamma", f"only {', '.join(_in_order(gamma_readers()))} read it, not the chosen losses "
                                f"({chosen}); drop simpo_gamma, or add one of those losses.")
        return [*reference, smoothing, gamma]

    @property
    def needs_reference(self) -> bool:
        """Whether a chosen loss reads reference log-probs (losses registered after import included)."""
        return not set(self.loss_type) <= reference_free_losses()


_DEFAULTS = argument_checks.field_defaults(DPOArguments)
