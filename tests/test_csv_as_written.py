""".csv data files: every cell is read as the text written in it (no numbers inferred), and a file without a
usable header row, or with a row longer than its header, is refused by name before any work."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest

from easytrain.data import DataError, SFTDataOptions, load_text_datasets, tokenize_and_group, tokenize_sft_dataset


def _load(tmp_path, train: str, validation: str | None = None) -> datasets.DatasetDict:
    (tmp_path / "train.csv").write_text(train, encoding="utf-8")
    if validation is not None:
        (tmp_path / "valid.csv").write_text(validation, encoding="utf-8")
    return load_text_datasets(train_file=tmp_path / "train.csv",
                              validation_file=None if validation is None else tmp_path / "valid.csv",
                              validation_split_percentage=0, cache_dir=tmp_path / "cache")


def test_numbers_in_cells_stay_the_text_written(tmp_path):
    splits = _load(tmp_path, "prompt,completion\n2+2=,4\n10+1=,011\n1/2=,0.50\n")
    train = splits["train"]
    assert {name: feature.dtype for name, feature in train.features.items()} == {"prompt": "string",
                                                                                 "completion": "string"}
    assert train["completion"] == ["4", "011", "0.50"]


def test_a_numeric_text_column_tokenises_as_text(tmp_path, tokenizer):
    """All-numeric text was inferred as float64 (`0012` -> 12.0), which the language-model task refused."""
    train = _load(tmp_path, "text\n0012\n3.50\n")["train"]
    assert train["text"] == ["0012", "3.50"]
    blocks = tokenize_and_group(train, tokenizer, max_length=2)
    assert len(blocks) >= 1


def test_prompt_completion_rows_with_numeric_answers_tokenise(tmp_path):
    from chat_fixtures import build_chat_tokenizer

    train = _load(tmp_path, "prompt,completion\n2+2=,4\n10+1=,011\n")["train"]
    rows, stats = tokenize_sft_dataset(train, build_chat_tokenizer("chatml"), SFTDataOptions(max_length=64))
    assert stats["num_kept"] == 2 and len(rows) == 2


def test_both_files_are_read_as_text_with_columns_in_any_order(tmp_path):
    """A numeric-looking train column and a text validation column failed to cast to one inferred type."""
    splits = _load(tmp_path, "text,label\n1,007\n2,x\n", "label,text\nhello,03\n")
    assert splits["train"]["label"] == ["007", "x"]
    assert splits["validation"]["text"] == ["03"] and splits["validation"]["label"] == ["hello"]


def test_files_with_other_columns_are_refused_naming_both_headers(tmp_path):
    with pytest.raises(DataError, match=r"`train_file` .* has the columns \['a', 'b'\] but `validation_file` .* "
                                        r"has \['a'\]; give both files the same header row"):
        _load(tmp_path, "a,b\n1,2\n", "a\n3\n")


@pytest.mark.parametrize(("text", "match"), [
    ("\n\n", r"has no header row"),
    ("a,b\n", r"has a header row but no rows of data"),
    ("a,a\n1,2\n", r"header row names the column 'a' twice"),
    ("a,\n1,2\n", r"header row has an empty column name \(column 2\)"),
    ("a,b\n1,2\n3,4,5\n", r"could not be read as csv \(ParserError: .*Expected 2 fields in line 3, saw 3"),
])
def test_a_file_without_a_usable_header_or_with_a_ragged_row_is_refused(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        _load(tmp_path, text)


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    (tmp_path / "bom.csv").write_text("prompt,completion\n2+2=,4\n", encoding="utf-8-sig")
    train = load_text_datasets(train_file=tmp_path / "bom.csv", validation_split_percentage=0,
                               cache_dir=tmp_path / "cache")["train"]
    assert train.column_names == ["prompt", "completion"] and train["completion"] == ["4"]


def test_a_header_that_is_not_utf8_is_refused_by_name(tmp_path):
    (tmp_path / "latin.csv").write_bytes("caf\xe9\nx\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"`train_file` .*latin\.csv' is not UTF-8 text.*save it as UTF-8"):
        load_text_datasets(train_file=tmp_path / "latin.csv", validation_split_percentage=0,
                           cache_dir=tmp_path / "cache")
