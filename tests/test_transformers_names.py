"""A name transformers.Trainer uses for what easytrain names otherwise points to easytrain's field, whose help
says how the two differ: `--data_seed` reads closest to `--dataset_name`, but means `seed`."""

import dataclasses

from easytrain import TrainingArguments
from easytrain.cli import main
from easytrain.suggestions import closest


def test_data_seed_on_the_command_line_points_to_seed(capsys):
    assert main(["train", "--data_seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown command-line argument '--data_seed'. Did you mean --seed?" in err, err


def test_data_seed_in_a_config_file_points_to_seed(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data_seed: 3\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "data_seed: unknown argument in " in (err := capsys.readouterr().err) and "Did you mean 'seed'?" in err, err


def test_seed_help_says_it_also_seeds_what_data_seed_leaves_alone():
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainingArguments)}["seed"]
    assert "data_seed" in help_text and "held-out validation split" in help_text and "init" in help_text, help_text


def test_a_known_name_is_only_suggested_where_it_is_a_choice():
    assert closest("data_seed", ["dataset_name", "seed"]) == "seed"
    assert closest("data_seed", ["dataset_name"]) == "dataset_name"
    assert closest("pakcing", ["packing", "seed"]) == "packing"
