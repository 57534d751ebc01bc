"""The content digest of the training rows a checkpoint's data position records: a resume over other rows of the
same count (an edited `train_file`, another `dataset_train` of the same length) is refused like a changed row
count, while the same rows, however they were built, resume exactly."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from easytrain import ArgumentError, BaseTrainer
from easytrain.checkpoint import CheckpointManager
from easytrain.data import TrainBatches
from easytrain.data.digest import rows_digest
from easytrain.data.errors import DataError
from easytrain.trainers.resume import check_data_position
from runs import args_for, copied_run, snapshot
from test_resume_inputs import NoCompute

def token_rows() -> dict[str, np.ndarray]:
    return {"input_ids": np.arange(12 * 9, dtype=np.int32).reshape(12, 9) * 7 % 301}


def one_token_changed(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    edited = rows["input_ids"].copy()
    edited[7, 3] += 1
    return {**rows, "input_ids": edited}


# ----------------------------------------------------------------------------- the digest


def test_one_token_in_one_row_changes_the_digest():
    rows = token_rows()
    assert rows_digest(rows) != rows_digest(one_token_changed(rows))
    as_dataset = datasets.Dataset.from_dict
    assert rows_digest(as_dataset(rows)) != rows_digest(as_dataset(one_token_changed(rows)))


@pytest.mark.parametrize("column, edited", [
    (["a b", "c", None], ["a b", "c", "d"]),
    (["a b", "c", "d"], ["a", " bc", "d"]),  # the same bytes ("a bcd"), split otherwise
    ([[[1, 2]], [[3]], []], [[[1, 2]], [[3]], [[]]]),
    ([[1, 2], None, [3]], [[1, 2], [], [3]]),
])
def test_text_nested_and_missing_values_count(column, edited):
    assert rows_digest(datasets.Dataset.from_dict({"x": column})) != rows_digest(
        datasets.Dataset.from_dict({"x": edited}))


def test_the_same_rows_built_differently_have_one_digest():
    """Chunking, a selection (an indices mapping), an integer width or columns instead of a dataset change no
    value the loader feeds, so none may refuse a resume (a `datasets` upgrade may store them otherwise)."""
    rows = token_rows()
    ids = rows["input_ids"]
    chunked = datasets.concatenate_datasets([datasets.Dataset.from_dict({"input_ids": ids[:5]}),
                                             datasets.Dataset.from_dict({"input_ids": ids[5:]})])
    order = np.random.default_rng(0).permutation(len(ids))
    selected = datasets.Dataset.from_dict({"input_ids": ids[order]}).select(np.argsort(order))
    wider = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int64"))}))
    digests = {rows_digest(source) for source in (rows, datasets.Dataset.from_dict(rows), chunked, selected, wider)}
    assert len(digests) == 1


@pytest.mark.parametrize("piece_bytes", [1, 200, 1 << 20])
def test_rows_a_chunk_each_are_joined_in_pieces_to_the_same_digest(monkeypatch, piece_bytes):
    """A selection's rows come an Arrow chunk each; small chunks are joined into pieces before they are fed, large
    ones fed as they are (`digest._fed_chunks`): whatever the piece size, the digest is the plain dataset's."""
    from easytrain.data import digest

    rng = np.random.default_rng(0)
    rows = {"input_ids": [list(rng.integers(0, 50, rng.integers(1, 120))) for _ in range(40)]}
    plain = rows_digest(datasets.Dataset.from_dict(rows))
    order = rng.permutation(40)
    selected = datasets.Dataset.from_dict({"input_ids": [rows["input_ids"][i] for i in order]}).select(
        np.argsort(order))
    monkeypatch.setattr(digest, "_PIECE_BYTES", piece_bytes)
    assert rows_digest(selected) == plain


def test_the_digest_is_the_same_in_another_process():
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import datasets; "
            "from easytrain.data.digest import rows_digest; from test_resume_data_digest import token_rows; "
            "print(rows_digest(datasets.Dataset.from_dict(token_rows())))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert child.stdout.strip().splitlines()[-1] == rows_digest(datasets.Dataset.from_dict(token_rows()))


def test_floating_point_columns_are_left_out():
    """Reference log-probs a run computes differ in their last bits on other hardware: they pick no example."""
    rows = token_rows() | {"ref_logps": np.linspace(-3.0, -1.0, 24, dtype=np.float32).reshape(12, 2)}
    nudged = rows | {"ref_logps": np.nextafter(rows["ref_logps"], np.float32(0))}
    assert rows_digest(rows) == rows_digest(nudged) == rows_digest(token_rows())
    as_dataset = datasets.Dataset.from_dict  # a [N, 2] column, as `pair_rows` adds: lists of floats
    assert rows_digest(as_dataset(rows)) == rows_digest(as_dataset(nudged)) == rows_digest(as_dataset(token_rows()))


# ----------------------------------------------------------------------------- the loader's data position


def test_every_process_records_the_digest_of_the_whole_dataset():
    """Each process holds every row (it reads its own by global index), so the digest means the same on all."""
    rows = datasets.Dataset.from_dict(token_rows())
    states = [TrainBatches(rows, 4, seed=0, process_index=p, process_count=2).iterator(2).get_state()
              for p in range(2)]
    assert states[0] == states[1] == TrainBatches(rows, 4, seed=0).iterator(2).get_state()
    assert states[0]["data_digest"] == rows_digest(rows)


def test_a_position_saved_for_other_rows_of_the_same_count_is_refused():
    saved = TrainBatches(token_rows(), 4, seed=0).iterator(2).get_state()
    loader = TrainBatches(one_token_changed(token_rows()), 4, seed=0)
    with pytest.raises(DataError, match=r"data_digest: saved '.+' vs now '.+'.*--allow_data_order_change"):
        loader.iterator().set_state(saved)
    with pytest.raises(ArgumentError, match=r"^resume_from_checkpoint: the training data changed since the checkpoint "
                                            r"\(data_digest: checkpoint '.+' vs now '.+'\).*same number of rows.*"
                                            r"--allow_data_order_change.*new output_dir"):
        check_data_position(saved, loader.fingerprint, allow=False)
    assert check_data_position(saved, loader.fingerprint, allow=True) is False


def test_a_position_saved_before_digests_were_recorded_is_kept():
    loader = TrainBatches(token_rows(), 4, seed=0)
    old = {key: value for key, value in loader.iterator(2).get_state().items() if key != "data_digest"}
    assert check_data_position(old, loader.fingerprint, allow=False) is True
    iterator = loader.iterator()
    iterator.set_state(old)
    assert iterator.step == 2


# ----------------------------------------------------------------------------- resuming a run


LINES = [" ".join(f"w{(i * 7 + j) % 23}" for j in range(12)) for i in range(40)]


def text(lines: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": lines})


def two_words_swapped(lines: list[str], line: int = 5) -> list[str]:
    """The same tokens in another order in one line: the same row count, other rows."""
    words = lines[line].split()
    words[2], words[3] = words[3], words[2]
    return [*lines[:line], " ".join(words), *lines[line + 1:]]


def data_args(output_dir, tokenizer_dir, **overrides):
    return args_for(output_dir, tokenizer_name=tokenizer_dir, max_train_samples=None, **overrides)


@pytest.fixture(scope="module")
def given_run(tmp_path_factory, tokenizer_dir) -> Path:
    """A 4-step run on a `dataset_train` and a `dataset_eval`: checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("given") / "run"
    BaseTrainer(data_args(output_dir, tokenizer_dir), dataset_train=text(LINES), dataset_eval=text(LINES[:8])).train()
    return output_dir


@pytest.fixture
def run_copy(given_run, tmp_path) -> Path:
    """This test's own copy of `given_run` (in place of tests/conftest.py's copy of the shared run)."""
    return copied_run(given_run, tmp_path / "run")


def resume(run, tokenizer_dir, train_lines, eval_lines=LINES[:8], trainer=NoCompute, **overrides):
    values = dict(max_steps=6, resume_from_checkpoint="latest") | overrides
    return trainer(data_args(run, tokenizer_dir, **values), dataset_train=text(train_lines),
                   dataset_eval=text(eval_lines))


def test_another_dataset_train_of_the_same_length_is_refused_before_compute(run_copy, tokenizer_dir):
    with CheckpointManager(run_copy / "checkpoints") as manager:
        saved = manager.read_data_state(4)
    before = snapshot(run_copy)
    trainer = resume(run_copy, tokenizer_dir, two_words_swapped(LINES))
    with pytest.raises(ArgumentError, match=r"^resume_from_checkpoint: the training data changed since the "
                                            r"checkpoint \(data_digest: .*--allow_data_order_change"):
        trainer.setup()
    assert trainer.configure_dataloaders().train.num_rows == saved["num_rows"]  # the count alone missed it
    assert snapshot(run_copy) == before


def test_allow_data_order_change_lets_other_rows_through_in_their_own_order(run_copy, tokenizer_dir, caplog):
    trainer = resume(run_copy, tokenizer_dir, two_words_swapped(LINES), trainer=BaseTrainer,
                     allow_data_order_change=True)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer.setup()
    assert int(trainer.state.step) == 4 and trainer.resumed_data_state is None
    assert re.search(r"the training data changed since the checkpoint \(data_digest: .*\): allow_data_order_change "
                     r"is set, so the data starts afresh", caplog.text), "the dropped position is said, not silent"


def test_another_eval_set_resumes_exactly(run_copy, tokenizer_dir):
    """The eval rows pick no training example: the saved position is kept."""
    trainer = resume(run_copy, tokenizer_dir, LINES, eval_lines=two_words_swapped(LINES[:8], line=2),
                     trainer=BaseTrainer)
    trainer.setup()
    assert trainer.resumed_data_state == {**trainer.dataloaders.train.fingerprint, "step": 4}


def test_a_checkpoint_without_a_digest_resumes_exactly(run_copy, tokenizer_dir):
    """Written by an easytrain that recorded no digest: nothing to compare, no refusal, the position is kept."""
    stored = run_copy / "checkpoints" / "4" / "data_state" / "metadata"
    position = json.loads(stored.read_text())
    stored.write_text(json.dumps({key: value for key, value in position.items() if key != "data_digest"}))
    trainer = resume(run_copy, tokenizer_dir, LINES, trainer=BaseTrainer)
    trainer.setup()
    assert trainer.resumed_data_state is not None and trainer.resumed_data_state["step"] == 4
    assert "data_digest" in position  # what the stripped file held: a checkpoint of this easytrain records one
