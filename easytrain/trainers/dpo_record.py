"""What a DPO run records for its resume (mixed into `DPOTrainer`): the options that decide its rows and whether
dropout runs in the loss (`task_settings`: a resume under other ones is refused), the loss's own options
(`loss_settings`: a resume under other ones is warned about, naming them, as the optimizer's hyperparameters are)
and what its reference was read from (`run_info`: the sources are read and checked again on resume, as for every
`initial_policy()`: `initial_policy_checks`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from easytrain.trainers.restore_checks import stored_record
from easytrain.trainers.resume_checks import LOSS_SETTINGS_KEY

logger = logging.getLogger("easytrain")


class DPORecordHooks:
    """`task_settings` and `run_info` of a `DPOTrainer` (its `dpo` arguments, `lora` and reference records)."""

    @functools.cached_property
    def _dropout_unrecorded(self) -> bool:
        """The resumed checkpoint predates disable_dropout (its run kept lora_dropout on): resume, warn if now off."""
        unrecorded = self._resume_from is not None and "disable_dropout" not in stored_record(self._resume_from,
                                                                                                "task_arguments")
        if unrecorded and self.dpo.disable_dropout and self.lora is not None and self.lora.dropout > 0:
            logger.warning("resuming a run trained with lora_dropout=%s in the DPO loss (its checkpoint predates "
                           "disable_dropout): the loss runs without it from here on; --no_disable_dropout keeps it",
                           self.lora.dropout)
        return unrecorded

    def task_settings(self) -> dict[str, Any]:
        """The options that decide the rows (and dropout in the loss), so a resume under other ones is refused."""
        task = {"max_prompt_length": self.dpo.max_prompt_length}
        task = {**task, "chat_template_path": path} if (path := self.dpo.chat_template_path) else task  # old: none
        return task if self._dropout_unrecorded else {**task, "disable_dropout": self.dpo.disable_dropout}

    def loss_settings(self) -> dict[str, Any]:
        """The options of the objective the loss reads (those no chosen loss reads are left out, so that they are not
        named as changed): the restored state fits other values, so a resume under them is warned about, not refused
        (beta may be changed on purpose)."""
        dpo = self.dpo
        settings = {"beta": dpo.beta, "loss_type": list(dpo.loss_type),
                    "loss_weights": list(dpo.loss_weights or [1.0] * len(dpo.loss_type)),
                    "label_smoothing": dpo.label_smoothing, "sync_ref_model": dpo.sync_ref_model}
        if "simpo" in dpo.loss_type:
            settings["simpo_gamma"] = dpo.simpo_gamma
        if dpo.sync_ref_model:
            settings |= {"ref_model_mixup_alpha": dpo.ref_model_mixup_alpha,
                         "ref_model_sync_steps": dpo.ref_model_sync_steps}
        return settings

    def run_info(self) -> dict[str, Any]:
        """Also the loss's options (warned about on resume); what the reference was read from (checked on resume) is
        recorded as every initial policy's (`InitialPolicyHooks.run_info`)."""
        return {**super().run_info(), LOSS_SETTINGS_KEY: self.loss_settings()}
