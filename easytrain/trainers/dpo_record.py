"""What a DPO run records for its resume (mixed into `DPOTrainer`): the options that decide its rows and loss
(`task_settings`: a resume under other ones is refused) and what its reference was read from (`run_info`: the
sources are read and checked again on resume, `dpo_reference`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from easytrain.trainers.dpo_reference import INITIAL_POLICY, LORA_ADAPTER, REFERENCE_WEIGHTS, stored_record

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
        """The options that decide the rows and the loss, so a resume under other ones is refused."""
        task = {"max_prompt_length": self.dpo.max_prompt_length}
        task = {**task, "chat_template_path": path} if (path := self.dpo.chat_template_path) else task  # old: none
        return task if self._dropout_unrecorded else {**task, "disable_dropout": self.dpo.disable_dropout}

    def run_info(self) -> dict[str, Any]:
        """Also what the reference was read from, checked on resume."""
        sources = {INITIAL_POLICY: self.initial_policy, LORA_ADAPTER: self.adapter_read,
                   REFERENCE_WEIGHTS: self.reference_weights}
        return {**super().run_info(), **{k: v for k, v in sources.items() if v is not None}}
