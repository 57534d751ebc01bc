"""A malformed `--config` file is refused like a missing one: `easytrain: error:` naming the file, the line and
column and the parser's message, exit code 2, no traceback."""

import re

import pytest

from easytrain.cli import main
from easytrain.config_io import load_config_file
from easytrain.errors import ArgumentError

CASES = {
    "broken.json": ('{"max_steps": 2,', r"line 1 column 17.*Expecting property name"),
    "broken.yaml": ("max_steps: [2\n", r"line 2 column 1.*expected ',' or ']'"),
    "tabs.yaml": ("max_steps: 2\n\tlearning_rate: 1\n", r"line 2 column 1.*tab"),
    "binary.json": (b"\xff\xfe{}", r"not UTF-8 text"),
}


def write(tmp_path, name):
    path = tmp_path / name
    text = CASES[name][0]
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_config_file_exits_2_with_the_place_and_the_parser_message(name, tmp_path, capsys):
    path = write(tmp_path, name)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easytrain: error: config:") and str(path) in err and "Traceback" not in err
    assert re.search(CASES[name][1], err, flags=re.S), err


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_config_file_raises_argument_error_naming_the_file(name, tmp_path):
    path = write(tmp_path, name)
    with pytest.raises(ArgumentError, match=CASES[name][1]) as error:
        load_config_file(path)
    assert error.value.field == "config" and str(path) in str(error.value)


@pytest.mark.parametrize("field, value, kind", [
    ("max_steps", "two", "an integer"), ("learning_rate", "fast", "a number"),
    ("scan_layers", "maybe", "True or False"),
])
def test_a_string_that_is_no_value_of_its_field_names_the_field_and_the_file(field, value, kind, tmp_path, capsys):
    """Strings for number and boolean fields are parsed as their command-line flags are ('2', '1e-3', 'yes'); one that
    is none is the file's error, not an 'invalid int value' of a flag the user never typed."""
    path = tmp_path / "wrong_type.json"
    path.write_text(f'{{"{field}": "{value}"}}')
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"easytrain: error: {field}:" in err and f"'{value}'" in err and kind in err, err
    assert str(path) in err and "argument --" not in err, err
