"""Local data files are read as they are now: a file rewritten with its old modification time (cp -p, rsync -t,
tar, a build tool that fixes mtimes) loads its new rows, and a resume over them is refused, while an unchanged file
is read from the `datasets` cache, not parsed again."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import datasets
import pytest

from easytrain import ArgumentError, BaseTrainer
from easytrain.data import load_text_datasets
from easytrain.data.sources import LOCAL_FILES_CACHE
from runs import args_for
from test_data_sources import _write
from test_resume_data_digest import LINES, two_words_swapped
from test_resume_inputs import NoCompute

#: A fixed modification time, as `cp -p` or an archive would give the replacing file.
OLD_MTIME_NS = 1_700_000_000_000_000_000


def rewritten(path: Path, texts: list[str]) -> Path:
    """`path` written with `texts`, its modification time set back to `OLD_MTIME_NS`."""
    _write(path, texts)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return path


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """This test's `datasets` cache (HF_DATASETS_CACHE as `datasets` read it at import)."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_a_train_file_rewritten_with_its_old_mtime_loads_its_new_rows(tmp_path, suffix):
    path = rewritten(tmp_path / f"train{suffix}", [f"old row {i}" for i in range(6)])
    load = lambda: list(load_text_datasets(train_file=path, validation_split_percentage=0,  # noqa: E731
                                           cache_dir=tmp_path / "cache")["train"]["text"])
    assert load() == [f"old row {i}" for i in range(6)]
    rewritten(path, [f"new row {i}" for i in range(4)])
    assert load() == [f"new row {i}" for i in range(4)]


def test_a_file_of_a_dataset_name_folder_rewritten_with_its_old_mtime_loads_its_new_rows(tmp_path, own_cache):
    folder = tmp_path / "data"
    folder.mkdir()
    path = rewritten(folder / "train.jsonl", ["old a", "old b", "old c"])
    load = lambda: list(load_text_datasets(dataset_name=str(folder),  # noqa: E731
                                           validation_split_percentage=0)["train"]["text"])
    assert load() == ["old a", "old b", "old c"]
    rewritten(path, ["new a", "new b"])
    assert load() == ["new a", "new b"]
    assert len(list((own_cache / LOCAL_FILES_CACHE).iterdir())) == 2  # in HF_DATASETS_CACHE: one per state


def test_an_unchanged_file_is_read_from_the_cache_not_parsed_again(tmp_path, own_cache):
    path = _write(tmp_path / "train.jsonl", [f"row {i}" for i in range(8)])
    first = load_text_datasets(train_file=path, validation_split_percentage=0)["train"]
    arrow = Path(first.cache_files[0]["filename"])
    written = arrow.stat().st_mtime_ns, arrow.stat().st_ino
    again = load_text_datasets(train_file=path, validation_split_percentage=0)["train"]
    assert again.cache_files == first.cache_files and (arrow.stat().st_mtime_ns, arrow.stat().st_ino) == written
    assert own_cache in arrow.parents


def test_a_resume_on_a_train_file_rewritten_with_its_old_mtime_is_refused(tmp_path, own_cache, tokenizer_dir):
    """The data digest is taken over the rows read: stale rows would let the resume through."""
    path = rewritten(tmp_path / "train.txt", LINES)
    output_dir = tmp_path / "run"
    common = dict(tokenizer_name=tokenizer_dir, train_file=str(path), validation_split_percentage=0,
                  max_train_samples=None)
    BaseTrainer(args_for(output_dir, **common)).train()
    rewritten(path, two_words_swapped(LINES))  # the same tokens, so the same number of blocks
    trainer = NoCompute(args_for(output_dir, max_steps=6, resume_from_checkpoint="latest", **common))
    with pytest.raises(ArgumentError, match=r"^resume_from_checkpoint: the training data changed since the "
                                            r"checkpoint \(data_digest: "):
        trainer.setup()
