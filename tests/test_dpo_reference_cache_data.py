"""Precomputed reference log-probs are cached under the content of the pairs they are computed for, not the rows'
`datasets` fingerprint: a local train_file rewritten keeping its modification time (cp -p, rsync -t) has its old
fingerprint (datasets keys it on path and mtime) but other pairs, which get their own log-probs, while an unchanged
file still reads the cache."""

import json
import os
import random
from pathlib import Path

import datasets
import numpy as np
import pytest

from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from test_dpo_trainer import tiny_args
from test_lora_trainer import write_base

#: A fixed modification time, as `cp -p` or an archive would give the replacing file.
OLD_MTIME_NS = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("base"))


def pairs(seed: int, count: int) -> list[dict[str, str]]:
    """`count` arithmetic pairs (right sum chosen, a wrong one rejected) drawn with `seed`."""
    draw = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = draw.randint(10, 99), draw.randint(10, 99)
        out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(draw.randint(100, 199))})
    return out


def rewritten(path: Path, rows: list[dict[str, str]]) -> Path:
    """`path` written with `rows`, its modification time set back to `OLD_MTIME_NS`."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return path


def precomputed(output: Path, base: Path, train_file: Path) -> DPOTrainer:
    args = tiny_args(output, model_name_or_path=str(base), train_file=str(train_file), validation_split_percentage=0,
                     max_train_samples=None, max_steps=1, overwrite_output_dir=True)
    trainer = DPOTrainer(args, DPOArguments(precompute_ref_log_probs=True))
    trainer.setup()
    return trainer


def reference_logps(trainer: DPOTrainer) -> np.ndarray:
    return np.asarray(trainer._dataset_train["ref_logps"])


@pytest.mark.parametrize("count", [16, 12], ids=["same_count", "fewer_pairs"])
def test_a_train_file_rewritten_with_its_old_mtime_gets_its_own_reference_log_probs(base, tmp_path, count):
    """Measured before: the rewritten file's run read the cache (cached True) and trained against the old pairs'
    log-probs; with 12 pairs instead of 16 it failed with "Column 'ref_logps' ... cannot join a batch of 12 pairs"."""
    data = rewritten(tmp_path / "pairs.jsonl", pairs(1, 16))
    first = precomputed(tmp_path, base, data)
    assert first.reference_logps_cached == {"train": False}
    rewritten(data, pairs(2, count))
    again = precomputed(tmp_path, base, data)
    assert again.reference_logps_cached == {"train": False}, "other pairs, same path and mtime: recomputed"
    fresh = precomputed(tmp_path / "fresh", base, rewritten(tmp_path / "fresh.jsonl", pairs(2, count)))
    np.testing.assert_array_equal(reference_logps(again), reference_logps(fresh))
    unchanged = precomputed(tmp_path, base, data)
    assert unchanged.reference_logps_cached == {"train": True}, "the same pairs: read from the cache"
    np.testing.assert_array_equal(reference_logps(unchanged), reference_logps(fresh))


def test_evaluate_on_other_pairs_under_the_same_fingerprint_recomputes(base, tmp_path):
    """An eval set is keyed by its pairs too: another set that carries the same `datasets` fingerprint (a file
    loaded again after a rewrite that kept its mtime) is not given the first set's log-probs."""
    trainer = precomputed(tmp_path, base, rewritten(tmp_path / "pairs.jsonl", pairs(1, 16)))
    first, second = (datasets.Dataset.from_list(pairs(seed, 8)) for seed in (3, 4))
    second._fingerprint = first._fingerprint
    one, other = (trainer.evaluate(dataset)["eval_loss"] for dataset in (first, second))
    assert trainer.reference_logps_cached["evaluate"] is False, "other pairs: recomputed"
    assert one == pytest.approx(np.log(2), abs=1e-6) and other == pytest.approx(np.log(2), abs=1e-6)
    trainer.evaluate(second)
    assert trainer.reference_logps_cached["evaluate"] is True, "the same pairs again: read from the cache"


def test_the_cache_is_read_only_where_every_process_sees_it(base, tmp_path, monkeypatch):
    """A process that does not see the main process's cache file yet runs the pass, whose gathers would wait forever
    for processes that read the file: all read it or all compute (found by review: two processes hung)."""
    from easytrain.trainers import dpo_reference

    assert dpo_reference.seen_by_every_process(True, gather=lambda flag: np.stack([flag, np.int32(0)])) is False
    assert dpo_reference.seen_by_every_process(True, gather=lambda flag: np.stack([flag, np.int32(1)])) is True
    assert dpo_reference.seen_by_every_process(False) is False and dpo_reference.seen_by_every_process(True)
    train_file = rewritten(tmp_path / "pairs.jsonl", pairs(0, 16))
    assert precomputed(tmp_path, base, train_file).reference_logps_cached == {"train": False}
    assert precomputed(tmp_path, base, train_file).reference_logps_cached == {"train": True}
    monkeypatch.setattr(dpo_reference, "seen_by_every_process", lambda found: False)  # another process sees no file
    assert precomputed(tmp_path, base, train_file).reference_logps_cached == {"train": False}
