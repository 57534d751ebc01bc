"""A config.json whose values transformers itself refuses, or whose RoPE scaling holds a value of the wrong type
(a hand-edited file), is a CheckpointError naming the file (and the key, for the RoPE values), with transformers'
error chained: not a StrictDataclassClassValidationError, KeyError or ZeroDivisionError naming neither."""

import json
import shutil

import pytest

from easytrain.models import init_model, load_pretrained
from easytrain.models.hf_io import CheckpointError, save_pretrained

from model_configs import tiny_config

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("config_values") / "model"
    model = init_model(tiny_config(max_position_embeddings=256), seed=0)
    save_pretrained(directory, model, model.config)
    return directory


@pytest.mark.parametrize("fields, match", [
    # was StrictDataclassClassValidationError: TypeError: '<=' not supported between instances of 'float' and 'str'
    ({"rope_parameters": LLAMA3 | {"low_freq_factor": "1.0"}}, r"\['low_freq_factor'\] = '1.0' must be a number"),
    # the Hub's v4 spelling; was StrictDataclassClassValidationError: '<' not supported between 'str' and 'int'
    ({"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": "32",
                                                "original_max_position_embeddings": 16}},
     r"\['beta_fast'\] = '32' must be a number"),
    # was KeyError: "Missing required keys in `rope_parameters` for 'rope_type'='llama3': {'high_freq_factor'}"
    ({"rope_parameters": {k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}}, r"KeyError.*high_freq_factor"),
    ({"rope_parameters": YARN | {"original_max_position_embeddings": 0}}, "ZeroDivisionError"),  # was bare
])
def test_a_config_json_transformers_refuses_is_named(saved, tmp_path, fields, match):
    directory = shutil.copytree(saved, tmp_path / "model")
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    with pytest.raises(CheckpointError, match=f"{path}.*{match}") as refusal:
        load_pretrained(directory)
    assert refusal.value.__cause__ is not None  # what refused it, chained


@pytest.mark.parametrize("fields", [{"rope_parameters": LLAMA3 | {"low_freq_factor": "1.0"}},
                                    {"rope_parameters": {k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}},
                                    {"rope_parameters": YARN | {"original_max_position_embeddings": 0}}],
                         ids=["a string", "a key missing", "a zero context"])
def test_a_trainer_names_model_name_or_path_for_such_a_config_json(saved, tmp_path, fields):
    """The trainer reads the config with transformers' AutoConfig, whose own refusals were raised bare."""
    from easytrain import ArgumentError, TrainingArguments
    from easytrain.trainers.builders import build_model_config

    directory = shutil.copytree(saved, tmp_path / "model")
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    with pytest.raises(ArgumentError, match=r"^model_name_or_path: cannot load a model config") as refusal:
        build_model_config(TrainingArguments(output_dir=str(tmp_path / "run"), model_name_or_path=str(directory)), None)
    assert refusal.value.__cause__ is not None
