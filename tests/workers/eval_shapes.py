"""A trainer on a data 2 x fsdp 2 mesh evaluates its eval set and sets of 3, 5 and 7 rows under eval_batch_size 8;
prints one JSON line: the devices, the mesh, the eval step's compiled programs, each set's metrics, and those of
its batches as before one eval batch shape (the set's own rows in one batch, rounded up to the 4 devices).

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4 by tests/test_eval_batch_shapes.py.
"""

import json
import sys
import tempfile
from pathlib import Path

import datasets
import jax
import numpy as np

from easytrain import BaseTrainer, TrainingArguments
from easytrain.data import eval_batches
from easytrain.steps import bound_eval
from easytrain.trainers.loop import evaluate_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chat_fixtures import build_chat_tokenizer  # noqa: E402


def blocks(rows: int, seed: int) -> datasets.Dataset:
    ids = np.random.default_rng(seed).integers(3, 200, (rows, 17))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def in_batches_of(trainer, rows, batch_size: int) -> dict[str, float]:
    batches = eval_batches(rows, batch_size, collate=trainer.collate)
    return evaluate_batches(bound_eval(trainer.functions.eval_step, trainer.state), map(trainer.to_global, batches))


def main(output_dir: str) -> dict:
    args = TrainingArguments(output_dir=output_dir, max_length=16, train_batch_size=8, eval_batch_size=8,
                             max_steps=1, data_parallel_size=2, fsdp_size=2, eval_strategy="no", save_strategy="no",
                             report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
                             validation_split_percentage=0)
    trainer = BaseTrainer(args, tokenizer=build_chat_tokenizer("chatml"), dataset_train=blocks(16, seed=0),
                          dataset_eval=blocks(12, seed=1))
    results = {"configured": trainer.evaluate(), **{size: trainer.evaluate(blocks(size, size)) for size in (3, 5, 7)}}
    compiles = trainer.functions.eval_step.__wrapped__._cache_size()
    expected = {"configured": in_batches_of(trainer, trainer.dataset_eval, 8)}
    for size in (3, 5, 7):
        expected[size] = in_batches_of(trainer, trainer.prepare_eval_dataset(blocks(size, size)), -(-size // 4) * 4)
    return {"devices": jax.device_count(), "mesh": dict(trainer.mesh.shape), "compiles": compiles,
            "results": results, "expected": expected}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        print(json.dumps(main(scratch)), flush=True)
