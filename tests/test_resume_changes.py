"""Changes since the checkpoint that a resume must not take silently: the data behind the same arguments, the
tokenizer, the function the model computes. Each is refused before any compute, naming the fix."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from easytrain import ArgumentError, BaseTrainer
from easytrain.checkpoint import CheckpointManager, finalized_steps
from easytrain.data import TrainBatches
from easytrain.data.errors import DataError
from easytrain.trainers.resume import check_resumable, restore_checkpoint
from runs import args_for, copied_run, snapshot
from test_resume_inputs import NoCompute

WORDS = "the quick brown fox jumps over the lazy dog and runs far away from home".split()


def write_text(path: Path, lines: int) -> None:
    path.write_text("\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(lines)))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    write_text(path, 60)
    return path


def file_args(output_dir, data_file, tokenizer_dir, **overrides):
    return args_for(output_dir, train_file=str(data_file), tokenizer_name=tokenizer_dir, max_train_samples=None,
                    validation_split_percentage=10, **overrides)


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, data_file, tokenizer_dir) -> Path:
    """A 4-step run on a text file with its own tokenizer: checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("file_run") / "run"
    BaseTrainer(file_args(output_dir, data_file, tokenizer_dir)).train()
    return output_dir


@pytest.fixture
def run_copy(file_run, tmp_path) -> Path:
    """This test's own copy of `file_run` (in place of tests/conftest.py's copy of the shared run)."""
    return copied_run(file_run, tmp_path / "run")


@pytest.fixture
def grown_data(data_file):
    """The same train_file path, now holding more text; put back afterwards."""
    before = data_file.read_text()
    write_text(data_file, 80)
    yield data_file
    data_file.write_text(before)


def resume(run, data_file, tokenizer_dir, trainer=NoCompute, **overrides):
    values = dict(max_steps=6, resume_from_checkpoint="latest") | overrides
    return trainer(file_args(run, data_file, tokenizer_dir, **values))


# ----------------------------------------------------------------------------- the data behind the same arguments


def test_a_data_position_saved_for_other_data_is_refused_before_any_array_is_read(run_copy):
    """`restore_checkpoint` checks the loader's fingerprint with the other resume checks: `target` is never used."""
    root = run_copy / "checkpoints"
    with CheckpointManager(root) as manager:
        run_info, position = manager.read_run_info(4), manager.read_data_state(4)
    changed = {key: position[key] for key in ("seed", "global_batch_size")} | {"num_rows": position["num_rows"] + 9}
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=rf"^resume_from_checkpoint: the training data changed .*num_rows: "
                                            rf"checkpoint {position['num_rows']} vs now {changed['num_rows']}.*"
                                            r"--allow_data_order_change"):
        restore_checkpoint((root, 4), run_info, None, data_fingerprint=changed)
    assert snapshot(run_copy) == before


def test_a_changed_dataset_is_refused_before_compute_and_before_the_output_dir_is_claimed(run_copy, grown_data,
                                                                                         tokenizer_dir):
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=r"resume_from_checkpoint: the training data changed.*num_rows"):
        resume(run_copy, grown_data, tokenizer_dir, resume_from_checkpoint=str(run_copy / "checkpoints" / "2")).train()
    assert snapshot(run_copy) == before  # checkpoint 4 not set aside, arguments.json not rewritten


@pytest.fixture
def edited_data(data_file):
    """The same train_file path and line count, two words of one line swapped (the same tokens in another order,
    so the same number of blocks); put back afterwards."""
    before = data_file.read_text()
    lines = before.split("\n")
    words = lines[3].split(" ")
    words[4], words[5] = words[5], words[4]
    data_file.write_text("\n".join([*lines[:3], " ".join(words), *lines[4:]]))
    yield data_file
    data_file.write_text(before)


def test_an_edited_train_file_of_the_same_row_count_is_refused_before_compute(run_copy, edited_data, tokenizer_dir):
    with CheckpointManager(run_copy / "checkpoints") as manager:
        saved = manager.read_data_state(4)
    before = snapshot(run_copy)
    trainer = resume(run_copy, edited_data, tokenizer_dir)
    with pytest.raises(ArgumentError, match=r"^resume_from_checkpoint: the training data changed since the "
                                            r"checkpoint \(data_digest: checkpoint '.+' vs now '.+'\).*"
                                            r"--allow_data_order_change"):
        trainer.setup()
    assert trainer.configure_dataloaders().train.num_rows == saved["num_rows"]  # the count alone missed it
    assert snapshot(run_copy) == before


def test_allow_data_order_change_continues_a_changed_dataset_in_its_own_order(run_copy, grown_data, tokenizer_dir):
    trainer = resume(run_copy, grown_data, tokenizer_dir, trainer=BaseTrainer, allow_data_order_change=True)
    trainer.train()
    assert finalized_steps(run_copy / "checkpoints") == [2, 4, 6]
    with CheckpointManager(run_copy / "checkpoints") as manager:
        assert manager.read_data_state(6) == {**trainer.dataloaders.train.fingerprint, "step": 6}


def test_a_data_position_for_other_data_names_a_fix_that_exists():
    rows = {"input_ids": [[1, 2, 3]] * 8}
    saved = TrainBatches(rows, 2, seed=0).iterator(3).get_state()
    with pytest.raises(DataError, match=r"num_rows: saved 8 vs now 12.*--allow_data_order_change") as refused:
        TrainBatches({"input_ids": [[1, 2, 3]] * 12}, 2, seed=0).iterator().set_state(saved)
    assert "without restoring the data state" not in str(refused.value)


# ----------------------------------------------------------------------------- the tokenizer


def test_another_tokenizer_is_refused_like_a_data_order_change(run_copy, data_file, tokenizer_dir, tmp_path):
    """Another tokenizer of the same size gives other ids for the same text: other examples at every step."""
    other = shutil.copytree(tokenizer_dir, tmp_path / "other_tokenizer")
    content = json.loads((other / "tokenizer.json").read_text())
    vocab = content["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: the same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(content))
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=r"resume_from_checkpoint: .*tokenizer_name: checkpoint .* vs now "
                                            r".*other_tokenizer.*--allow_data_order_change"):
        resume(run_copy, data_file, str(other)).setup()
    assert snapshot(run_copy) == before


def test_the_same_tokenizer_moved_elsewhere_resumes(run_copy, data_file, tokenizer_dir, tmp_path):
    """The tokenizer is compared by what it does, not by its path: base models and tokenizers move between
    clusters."""
    moved = shutil.copytree(tokenizer_dir, tmp_path / "moved_tokenizer")
    trainer = resume(run_copy, data_file, str(moved), trainer=BaseTrainer)
    assert int(trainer.state.step) == 4


def run_info_with(**arguments) -> dict:
    defaults = dict(seed=0, train_batch_size=4, tokenizer_name=None, model_name_or_path=None)
    return {"format_version": 1, "arguments": defaults | arguments, "model_config": None}


@pytest.mark.parametrize("stored, now, refused", [
    (dict(model_name_or_path="models/a"), dict(model_name_or_path="models/b"), True),
    (dict(model_name_or_path="models/a"), dict(model_name_or_path="models/b", tokenizer_name="models/a"), False),
    (dict(model_name_or_path="models/a"), dict(model_name_or_path="models/a", tokenizer_name="models/a"), False),
])
def test_the_tokenizer_a_model_supplies_counts_as_the_runs_tokenizer(stored, now, refused):
    if refused:
        with pytest.raises(ArgumentError, match=r"tokenizer_name \(from model_name_or_path\): checkpoint "
                                                r"'models/a' vs now 'models/b'"):
            check_resumable(run_info_with(**stored), run_info_with(**now))
    else:
        assert check_resumable(run_info_with(**stored), run_info_with(**now)) == []


# ----------------------------------------------------------------------------- the model's function


@pytest.mark.parametrize("change, listed", [
    (dict(rope_theta=500.0), r"rope_parameters: checkpoint \{.*10000.0.*\} vs now \{.*500.0.*\}"),
    (dict(hidden_act="gelu"), r"hidden_act: checkpoint 'silu' vs now 'gelu'"),
    (dict(rms_norm_eps=0.1), r"rms_norm_eps: checkpoint 1e-06 vs now 0.1"),
])
def test_an_architecture_change_that_keeps_every_shape_is_refused(run_copy, data_file, tokenizer_dir, tmp_path,
                                                                  change, listed):
    from easytrain.models.presets import PRESETS

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", **PRESETS["tiny"], **change}))
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=rf"^model_config: .*different architecture \(.*{listed}"):
        resume(run_copy, data_file, tokenizer_dir, model_config=str(config)).setup()
    assert snapshot(run_copy) == before


def test_config_keys_an_older_checkpoint_did_not_record_are_not_compared():
    stored, now = run_info_with(), run_info_with()
    stored["model_config"] = {"model_type": "llama", "hidden_size": 128}
    now["model_config"] = {"model_type": "llama", "hidden_size": 128, "rope_parameters": {"rope_theta": 1.0},
                           "hidden_act": "gelu", "transformers_version": "9.0", "eos_token_id": 7}
    assert check_resumable(stored, now) == []


def test_harmless_config_keys_may_differ():
    stored, now = run_info_with(), run_info_with()
    stored["model_config"] = {"model_type": "llama", "eos_token_id": 2, "dtype": "float32", "architectures": None,
                              "transformers_version": "5.0", "initializer_range": 0.02}
    now["model_config"] = {"model_type": "llama", "eos_token_id": 3, "dtype": "bfloat16",
                           "architectures": ["LlamaForCausalLM"], "transformers_version": "5.23.0",
                           "initializer_range": 0.5}
    assert check_resumable(stored, now) == []


# ----------------------------------------------------------------------------- run length, LoRA targets


def test_max_steps_below_the_checkpoint_step_is_refused_when_training(run_copy, data_file, tokenizer_dir):
    """Training has nothing to do; evaluating that checkpoint (max_steps left at a default below it) is fine."""
    before = snapshot(run_copy)
    trainer = resume(run_copy, data_file, tokenizer_dir, trainer=BaseTrainer, max_steps=2)
    assert int(trainer.state.step) == 4 and "eval_loss" in trainer.evaluate()
    with pytest.raises(ArgumentError, match=r"^max_steps: 2 is below the checkpoint's step 4.*--max_steps"):
        trainer.train()
    assert snapshot(run_copy) == before


def test_lora_target_modules_in_another_order_are_the_same_adapters():
    stored = run_info_with(lora_rank=4, lora_target_modules=["q_proj", "v_proj"])
    now = run_info_with(lora_rank=4, lora_target_modules=["v_proj", "q_proj"])
    assert check_resumable(stored, now) == []
    with pytest.raises(ArgumentError, match="lora_target_modules"):
        check_resumable(stored, run_info_with(lora_rank=4, lora_target_modules=["q_proj"]))


@pytest.mark.parametrize("stored, now, warned", [
    (dict(dtype="float32"), dict(dtype="bfloat16"), r"dtype: checkpoint 'float32' vs now 'bfloat16'"),
    (dict(dtype="bfloat16"), dict(dtype="bfloat16"), None),
])
def test_a_changed_compute_dtype_resumes_with_a_warning(caplog, stored, now, warned):
    """Another compute dtype fits the stored arrays (param_dtype decides them) but changes every later step's
    numbers: not an exact resume, so said, like a changed schedule, rather than continued in silence."""
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        assert check_resumable(run_info_with(**stored), run_info_with(**now)) == []
    if warned is None:
        assert not caplog.records
    else:
        assert re.search(warned, caplog.text) and "not what the checkpointed run would have computed" in caplog.text


@pytest.mark.parametrize("field, stored, now", [
    ("weight_decay", 0.0, 0.5), ("adam_beta1", 0.9, 0.5), ("adam_beta2", 0.999, 0.99), ("adam_epsilon", 1e-8, 0.1),
    ("max_grad_norm", 1.0, 0.05), ("gradient_accumulation_steps", 1, 2),
])
def test_changed_update_settings_resume_with_a_warning_naming_them(caplog, field, stored, now):
    """Optimizer settings and the gradient's accumulation fit the stored state but change every later update: said,
    like another compute dtype, rather than continued in silence (resumed losses drifted from step 6 on)."""
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        assert check_resumable(run_info_with(**{field: stored}), run_info_with(**{field: now})) == []
    assert f"{field}: checkpoint {stored!r} vs now {now!r}" in caplog.text
    assert "not what the checkpointed run would have computed" in caplog.text


@pytest.mark.parametrize("stored, now, warned", [
    ({"devices": 8, "shape": {"data": 1, "fsdp": 8, "tensor": 1}},
     {"devices": 4, "shape": {"data": 1, "fsdp": 4, "tensor": 1}}, True),
    ({"devices": 8, "shape": {"data": 2, "fsdp": 4, "tensor": 1}},
     {"devices": 8, "shape": {"data": 2, "fsdp": 4, "tensor": 1}}, False),
    (None, {"devices": 4, "shape": {"data": 4, "fsdp": 1, "tensor": 1}}, False),  # a checkpoint from before it
])
def test_another_mesh_resumes_with_a_warning_that_the_sums_run_in_another_order(caplog, stored, now, warned):
    """The restored state is laid out for any mesh, but a step's sums then run in another order: the curve goes on
    to rounding, not bit for bit (fsdp 8 -> 4: step 6's loss 2.5468111 vs 2.5468109), so the resume says so."""
    info = {"format_version": 1, "arguments": run_info_with()["arguments"], "model_config": None}
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        check_resumable(info if stored is None else {**info, "mesh": stored}, {**info, "mesh": now})
    assert ("another mesh" in caplog.text) == warned, caplog.text


def test_the_mesh_record_counts_the_mesh_devices_not_the_process(tmp_path, monkeypatch):
    """A mesh over some of the process's devices (a custom `configure_mesh`) records its own size: a resume on the
    same mesh then warns of nothing (it recorded the process's 8 devices, then compared them with a 4-device mesh)."""
    import easytrain.trainers.base as base_module

    trainer = BaseTrainer(args_for(tmp_path / "run"))
    trainer.setup()
    monkeypatch.setattr(base_module.jax, "device_count", lambda *_: 8)  # more devices than the mesh holds
    assert trainer.run_info()["mesh"] == {"devices": trainer.mesh.size, "shape": dict(trainer.mesh.shape)}
