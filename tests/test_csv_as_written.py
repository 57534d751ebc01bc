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
])
def test_a_file_without_a_usable_header_is_refused(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        _load(tmp_path, text)


@pytest.mark.parametrize(("text", "line", "fields", "width"), [
    ("a,b\n1,2,3\n", 2, 3, 2),  # the first data row: pandas took its first cell as the index, a='2', b='3'
    ("text\nhello, world\ngood, day\n", 2, 2, 1),  # an unquoted comma in a one-column file lost half the row
    ("prompt,completion\nWhat is 2+2?, 4,extra\nHi,there\n", 2, 3, 2),
    ("a,b\n1,2\n3,4,5\n", 3, 3, 2),  # a later row
    ("a,b\n1,2,\n", 2, 3, 2),  # a trailing comma
    ("\na,b\n\n1,2,3\n", 4, 3, 2),  # blank lines count as an editor counts them
    ('a,b\n"x\ny",2\n3,4,5\n', 4, 3, 2),  # so do the lines inside a quoted cell
])
def test_a_row_longer_than_the_header_is_refused_naming_file_and_line(tmp_path, text, line, fields, width):
    with pytest.raises(DataError, match=rf"`train_file` .*train\.csv': line {line} has {fields} fields but the "
                                        rf"header row has {width}; put a cell that contains a comma in double "
                                        r'quotes \("hello, world"\)'):
        _load(tmp_path, text)


def test_a_quoted_comma_and_a_cell_past_the_csv_modules_field_limit_are_read(tmp_path):
    long_cell = "x" * 200_000  # the csv module refuses fields over 131072 characters by default; pandas does not
    train = _load(tmp_path, f'text,label\n"hello, world",a\n{long_cell},b\n')["train"]
    assert train["text"] == ["hello, world", long_cell] and train["label"] == ["a", "b"]


def test_a_longer_row_in_the_validation_file_is_refused_by_name(tmp_path):
    with pytest.raises(DataError, match=r"`validation_file` .*valid\.csv': line 3 has 2 fields"):
        _load(tmp_path, "text\nhi\n", "text\nok\nhello, world\n")


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


def test_an_unchanged_file_is_not_read_again_at_the_next_start_a_changed_one_is(tmp_path, monkeypatch):
    """The row check reads the whole file (about 12 s per GB); a resume of an unchanged file reads its header only."""
    from easytrain.data import csv_files

    checked = []
    check = csv_files._check_row_lengths
    monkeypatch.setattr(csv_files, "_check_row_lengths", lambda rows, *a: checked.append(1) or check(rows, *a))
    assert list(_load(tmp_path, "text,label\nhi,a\n")["train"]["text"]) == ["hi"] and len(checked) == 1
    path = tmp_path / "train.csv"
    again = load_text_datasets(train_file=path, validation_split_percentage=0, cache_dir=tmp_path / "cache")
    assert list(again["train"]["text"]) == ["hi"] and len(checked) == 1  # the same file: its header read only
    stat = path.stat()
    path.write_text("text,label\nhi,a,b\n", encoding="utf-8")  # another row, the same size and mtime (cp -p)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=r"line 2 has 3 fields"):
        load_text_datasets(train_file=path, validation_split_percentage=0, cache_dir=tmp_path / "cache")
    assert len(checked) == 2
