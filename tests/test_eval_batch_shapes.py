"""Every eval batch of a trainer has one shape: sets smaller than `eval_batch_size` (and a last partial batch) are
padded to it with zero-weight rows, so evaluating several small sets (per-task evals) compiles the eval step once
(language modelling, SFT, DPO; on a 4-device mesh too, tests/workers/eval_shapes.py). A set whose batches keep their
shape (the configured eval set here) gives the same metrics to the bit; a smaller set gives the metrics of its own
rows in a batch of their own, up to float32 rounding: XLA:CPU's logits of a row in a 3-row batch differ from the
same row's in an 8-row batch by up to 4e-7 (a matmul's sums in another order), and counts are exact."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from chat_fixtures import build_chat_tokenizer
from easytrain import BaseTrainer, TrainingArguments
from easytrain.data import EvalBatches, eval_batches
from easytrain.data.loader import count_rows
from easytrain.sharding import data_parallel_size
from easytrain.steps import bound_eval
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.loop import evaluate_batches
from easytrain.trainers.sft import SFTTrainer
from runs import child_env, xla_flags

ROOT = Path(__file__).resolve().parents[1]
SIZES = (3, 5, 7)  # rows of the small sets, under eval_batch_size 8


def arguments(path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(path), model_config="tiny", max_length=16, train_batch_size=8, eval_batch_size=8,
                  max_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                  save_pretrained_at_end=False, validation_split_percentage=0)
    return TrainingArguments(**(values | overrides))


def blocks(rows: int, seed: int) -> datasets.Dataset:
    """Pre-tokenized language-model rows (max_length + 1 tokens each): one row an example."""
    ids = np.random.default_rng(seed).integers(3, 200, (rows, 17))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def compiles(trainer) -> int:
    """Programs the trainer's eval step has compiled (one per batch shape)."""
    return trainer.functions.eval_step.__wrapped__._cache_size()


def in_batches_of(trainer, rows, batch_size: int) -> dict[str, float]:
    """The metrics of `rows` evaluated in batches of `batch_size` by the trainer's eval step: with the set's own row
    count (rounded up to the data-parallel devices), what `evaluate` gave before every eval batch had one shape."""
    batches = eval_batches(rows, batch_size, collate=trainer.collate)
    return evaluate_batches(bound_eval(trainer.functions.eval_step, trainer.state), map(trainer.to_global, batches))


def own_batch(trainer, rows) -> dict[str, float]:
    step = data_parallel_size(trainer.mesh)
    return in_batches_of(trainer, rows, -(-len(rows) // step) * step)


def assert_same_metrics(got: dict[str, float], expected: dict[str, float], what: object) -> None:
    """The same metrics: counts exactly, values up to float32 rounding (a padding row that weighed anything would
    move them by far more)."""
    assert got.keys() == expected.keys(), what
    for name, value in expected.items():
        exact = name.endswith("num_tokens")
        assert got[name] == (value if exact else pytest.approx(value, rel=1e-5, abs=1e-7)), (what, name)


def check_one_shape(trainer, examples: dict[int, datasets.Dataset]) -> None:
    """The configured eval set and every small set share one compiled eval step; the configured set's metrics are
    those of its batches as before to the bit, and each small set's those of its own rows in one batch."""
    configured = trainer.evaluate()
    results = {size: trainer.evaluate(rows) for size, rows in examples.items()}
    assert compiles(trainer) == 1, f"{compiles(trainer)} eval programs for the configured set and sets of {SIZES}"
    assert configured == in_batches_of(trainer, trainer.dataset_eval, trainer.arguments.eval_batch_size)
    for size, rows in examples.items():
        prepared = trainer.prepare_eval_dataset(rows)
        assert count_rows(prepared) == size
        assert_same_metrics(results[size], own_batch(trainer, prepared), size)


def test_small_eval_sets_compile_the_eval_step_once_with_unchanged_metrics(tmp_path):
    trainer = BaseTrainer(arguments(tmp_path, eval_strategy="steps", eval_steps=1),
                          tokenizer=build_chat_tokenizer("chatml"), dataset_train=blocks(16, seed=0),
                          dataset_eval=blocks(12, seed=1))
    trainer.train()  # evaluates the configured set (12 rows: a full batch and a padded one) during training
    check_one_shape(trainer, {size: blocks(size, seed=size) for size in SIZES})


def chats(count: int, start: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"it is {2 * i}"}]}
                                       for i in range(start, start + count)])


def pairs(count: int, start: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(start, start + count)],
                                       "chosen": [str(2 * i) for i in range(start, start + count)],
                                       "rejected": [str(2 * i + 1) for i in range(start, start + count)]})


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_sft_and_dpo_evaluate_small_sets_with_one_eval_step(tmp_path, kind):
    """Both evaluate through the same batches: conversations of one length bucket, and pairs (with their
    precomputed reference log-probs)."""
    if kind == "sft":
        trainer = SFTTrainer(arguments(tmp_path), tokenizer=build_chat_tokenizer("chatml"),
                             dataset_train=chats(16, 0), dataset_eval=chats(12, 20))
        examples = {size: chats(size, 40 + size) for size in SIZES}
    else:
        trainer = DPOTrainer(arguments(tmp_path, max_train_samples=16, max_eval_samples=12))
        examples = {size: pairs(size, 10 * size) for size in SIZES}
    check_one_shape(trainer, examples)


@pytest.mark.parametrize("rows, batch_size, multiple_of, expected", [
    (3, 8, 1, 8), (5, 8, 1, 8), (7, 8, 1, 8), (12, 8, 1, 8), (1, 16, 4, 16), (3, 64, 8, 64),
    (38, 100, 1, 64), (38, 100_000, 8, 64), (65, 100_000, 1, 128), (100, 100, 1, 100), (40, 96, 6, 96),
    (100, 1000, 6, 192)])
def test_an_eval_batch_is_the_eval_batch_size_or_a_power_of_two_of_the_devices_from_64_rows(
        rows, batch_size, multiple_of, expected):
    """Up to 64 rows, every set is padded to the eval batch; a larger eval batch than a set shrinks only to a
    power of two of the data-parallel devices holding the set: few shapes, and never a batch mostly padding
    (38 rows under eval_batch_size 100000 would not fit in memory)."""
    batches = EvalBatches({"input_ids": np.zeros((rows, 3), np.int32)}, batch_size, multiple_of=multiple_of)
    assert batches.global_batch_size == expected and expected % multiple_of == 0
    ids = np.concatenate([batch["example_id"] for batch in batches])
    assert sorted(ids[ids >= 0].tolist()) == list(range(rows))


def test_small_eval_sets_share_one_eval_step_on_a_data_and_fsdp_mesh():
    """data 2 x fsdp 2: the padded batch divides over the 4 devices, metrics are the set's own batch's."""
    env = child_env(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "eval_shapes.py")], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["devices"] == 4 and facts["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}, facts
    assert facts["compiles"] == 1, facts
    assert facts["results"]["configured"] == facts["expected"]["configured"]
    for size in ("3", "5", "7"):
        assert_same_metrics(facts["results"][size], facts["expected"][size], size)
