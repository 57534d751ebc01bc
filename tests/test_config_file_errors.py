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
