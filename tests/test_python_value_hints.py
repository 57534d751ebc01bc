"""A transformers value given from Python (`TrainingArguments(warmup_steps=0.1)`, `from_dict`) is refused with the
same easytrain setting the command line and config files name (warmup_ratio for a fractional warmup_steps, whole
epochs or max_steps for fractional epochs), not only "must be an integer": a port of a transformers script passes
these values as they were."""

import pytest

from easytrain import TrainingArguments
from easytrain.errors import ArgumentError


@pytest.mark.parametrize("build", [lambda values: TrainingArguments(**values), TrainingArguments.from_dict])
@pytest.mark.parametrize("values, expected", [
    ({"warmup_steps": 0.1}, "warmup_ratio=0.1"),
    ({"num_train_epochs": 1.5}, "Epochs are whole here"),
])
def test_a_transformers_value_from_python_names_the_easytrain_setting(build, values, expected):
    with pytest.raises(ArgumentError) as error:
        build(values)
    assert "must be an integer" in str(error.value) and expected in str(error.value), error.value


def test_a_whole_float_still_gets_its_integer_spelling():
    with pytest.raises(ArgumentError, match="Write 2.") as error:
        TrainingArguments(num_train_epochs=2.0)
    assert "Epochs are whole" not in str(error.value), error.value
