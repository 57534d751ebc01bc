"""A task whose collate yields a token id past the vocabulary on process 1 only: process 1 fails at its first
batch while the others wait for it in their first step's collectives (`test_process_failure`)."""

import jax

from easytrain import BaseTrainer


class PastVocabularyOnProcessOne(BaseTrainer):
    def collate(self, rows, example_ids):
        batch = super().collate(rows, example_ids)
        if jax.process_index() == 1:
            batch["input_ids"][0, 0] = self.model_config.vocab_size
        return batch
