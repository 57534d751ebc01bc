"""One DPO step with reference log-probs precomputed on a data-parallel mesh of 8 devices (one process's or two
processes' 4 each): every pair's (chosen, rejected) reference log-probs, whether they were read from a cache, and
the first step's loss (ln 2: the reference is the initial policy).

A process computes the reference pass over its share of each batch only; the log-probs of the other process's pairs
reach it through the gather (`dpo_reference.precomputed_reference_logps`). A pair it misses keeps 0.0, and its
rewards are then the policy's whole log-probs.

Run inside tests/workers/mesh_equivalence.py's processes (its `--dpo`), by tests/test_multiprocess.py.
"""

import jax
import numpy as np

from easytrain import Callback, TrainingArguments
from easytrain.sharding import make_mesh
from easytrain.trainers.dpo import DPOArguments, DPOTrainer


def precomputed_dpo_step(output_dir: str, multi_process: dict) -> dict:
    """`multi_process`: the coordinator arguments of a two-process run, empty for one process."""
    captured, losses = {}, []

    class Trainer(DPOTrainer):
        def configure_mesh(self):
            return make_mesh(8, 1, 1, devices=jax.devices()[:8])

        def prepare_datasets(self):
            train, evaluation = super().prepare_datasets()
            captured["ref_logps"] = np.asarray(train["ref_logps"], np.float64).tolist()
            return train, evaluation

    class Record(Callback):
        def on_log(self, trainer, step, logs):
            losses.append(logs["loss"])

    # 24 pairs in batches of 16: the second batch is part padding, each process's share of it smaller
    args = TrainingArguments(output_dir=output_dir, max_length=16, train_batch_size=16, eval_batch_size=16,
                             max_steps=1, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=24,
                             data_parallel_size=8, **multi_process)
    trainer = Trainer(args, DPOArguments(precompute_ref_log_probs=True), callbacks=[Record()])
    trainer.train()
    return {"ref_logps": captured["ref_logps"], "cached": trainer.reference_logps_cached["train"], "losses": losses}
