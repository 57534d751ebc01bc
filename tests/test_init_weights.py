"""`init_weights_from`: a fresh run (optimizer, step, RNG, data order) on another run's weights, read from its
checkpoint or its exported model, with a clear error when they do not fit."""

import json
import re
import shutil

import jax
import numpy as np
import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.errors import CheckpointReadError


def tiny(output_dir, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=32, train_batch_size=8, eval_batch_size=8, max_steps=3,
                  logging_steps=1, eval_strategy="no", save_strategy="steps", save_steps=3, report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=8)
    values.update(overrides)
    return TrainingArguments(**values)


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("source")
    trainer = BaseTrainer(tiny(directory, save_pretrained_at_end=True))
    trainer.train()
    return directory, jax.device_get(trainer.state.params)


def first_batch_ids(trainer) -> np.ndarray:
    return next(trainer.dataloaders.train.iterator(0))["example_id"]


@pytest.mark.parametrize("where", ["output_dir", "checkpoint_step", "exported_model"])
def test_starts_from_the_weights_with_a_fresh_optimizer_step_and_data_order(tmp_path, source_run, where):
    directory, trained = source_run
    source = {"output_dir": directory, "checkpoint_step": directory / "checkpoints" / "3",
              "exported_model": directory / "final_model"}[where]
    trainer = BaseTrainer(tiny(tmp_path / "new", init_weights_from=str(source), seed=42))
    assert_trees_equal(jax.device_get(trainer.state.params), trained)
    assert int(trainer.state.step) == 0
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(trainer.state.opt_state)), "fresh moments"
    scratch = BaseTrainer(tiny(tmp_path / "scratch", seed=42))
    np.testing.assert_array_equal(first_batch_ids(trainer), first_batch_ids(scratch))
    first_leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0])
    assert np.abs(first_leaf(scratch.state.params) - first_leaf(trained)).max() > 0
    trainer.train()
    assert int(trainer.state.step) == 3


def test_weights_of_another_architecture_fail_naming_the_argument_before_compute(tmp_path, source_run, monkeypatch):
    directory, _ = source_run
    config = tmp_path / "wider.json"
    config.write_text('{"hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 2, '
                      '"num_attention_heads": 4, "num_key_value_heads": 2}')
    with pytest.raises(ArgumentError) as error:
        BaseTrainer(tiny(tmp_path / "new", init_weights_from=str(directory), model_config=str(config))).setup()
    assert error.value.field == "init_weights_from"
    assert "source (" in str(error.value) and "vs model (" in str(error.value)
    with pytest.raises(ArgumentError) as error:
        BaseTrainer(tiny(tmp_path / "none", init_weights_from=str(tmp_path / "missing"))).setup()
    assert error.value.field == "init_weights_from"


def test_a_lora_run_takes_its_base_from_a_full_run(tmp_path, source_run):
    directory, trained = source_run
    trainer = BaseTrainer(tiny(tmp_path / "lora", init_weights_from=str(directory), lora_rank=4))
    kernel = trainer.state.base["layers"][0]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(trained["layers"][0]["self_attn"]["q_proj"]["kernel"]))
    assert not np.any(np.asarray(trainer.state.params["layers"][0]["self_attn"]["q_proj"]["lora_b"]))


@pytest.fixture(scope="module")
def bfloat16_run(tmp_path_factory):
    """A one-step run that stores its parameters in bfloat16."""
    directory = tmp_path_factory.mktemp("bfloat16")
    trainer = BaseTrainer(tiny(directory, max_steps=1, save_steps=1, param_dtype="bfloat16", dtype="bfloat16"))
    trainer.train()
    return directory, jax.device_get(trainer.state.params)


@pytest.mark.parametrize("into", ["float32", "bfloat16"])
def test_a_checkpoint_of_another_param_dtype_is_verified_as_stored_then_cast(tmp_path, source_run, bfloat16_run, into):
    directory, trained = bfloat16_run if into == "float32" else source_run
    trainer = BaseTrainer(tiny(tmp_path / "new", init_weights_from=str(directory), param_dtype=into, dtype=into))
    assert_trees_equal(jax.device_get(trainer.state.params), jax.tree.map(lambda x: x.astype(into), trained))


def copied(run, tmp_path):
    return shutil.copytree(run, tmp_path / "source")


def test_values_that_differ_from_the_fingerprint_are_refused_also_when_cast(tmp_path, bfloat16_run):
    source = copied(bfloat16_run[0], tmp_path)
    fingerprint = source / "checkpoints" / "1" / "fingerprint" / "metadata"
    digests = json.loads(fingerprint.read_text())
    digests["params.embed_tokens.embedding"][1] ^= 1  # as if the stored bits had changed
    fingerprint.write_text(json.dumps(digests))
    with pytest.raises(CheckpointReadError, match=r"^init_weights_from: the checkpoint .*checkpoints/1 cannot be "
                                                  r"read \(CorruptCheckpointError: .*1 array\(s\).*embed_tokens"):
        BaseTrainer(tiny(tmp_path / "new", init_weights_from=str(source))).setup()


@pytest.mark.parametrize("damage", ["metadata", "truncate"])
def test_damaged_files_are_refused_naming_the_argument_and_the_checkpoint(tmp_path, source_run, damage):
    source = copied(source_run[0], tmp_path)
    state = source / "checkpoints" / "3" / "state"
    if damage == "metadata":
        (state / "_METADATA").write_text("{not json")
    for path in [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"] * (damage == "truncate"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    step_dir = re.escape(str(source / "checkpoints" / "3"))
    with pytest.raises(CheckpointReadError, match=rf"^init_weights_from: the checkpoint {step_dir} cannot be read "
                                                  r".*corrupted or truncated.*final_model") as refused:
        BaseTrainer(tiny(tmp_path / "new", init_weights_from=str(source))).setup()
    if damage == "metadata":
        assert "3/state/_METADATA is not valid JSON" in str(refused.value), "names the file that is not JSON"


def test_a_source_checkpoint_whose_fingerprint_was_deleted_is_refused(tmp_path, source_run):
    """Deleting fingerprint/ must not turn the integrity check off: the step's Orbax metadata lists the item."""
    source = copied(source_run[0], tmp_path)
    shutil.rmtree(source / "checkpoints" / "3" / "fingerprint")
    with pytest.raises(CheckpointReadError, match=r"^init_weights_from: the checkpoint .*checkpoints/3 cannot be "
                                                  r"read .*fingerprint/ item is missing"):
        BaseTrainer(tiny(tmp_path / "new", init_weights_from=str(source))).setup()
