"""`compiler_options`: XLA options for the compiled steps, parsed, defaulted per backend and checked before
any training compute."""

import numpy as np
import pytest

from easytrain import BaseTrainer, TrainingArguments, compiler_options
from easytrain.errors import ArgumentError

YNN = "xla_cpu_experimental_ynn_fusion_type"


def tiny_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=8, max_steps=4,
                  learning_rate=3e-3, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
                  validation_split_percentage=0)
    values.update(overrides)
    return TrainingArguments(**values)


def test_pairs_are_parsed_with_xla_value_types():
    assert compiler_options.parse("") == {}
    assert compiler_options.parse(" xla_a=true, xla_b=FALSE,xla_c=3 ,xla_d=LIBRARY_FUSION_TYPE_DOT,xla_e=") == {
        "xla_a": True, "xla_b": False, "xla_c": 3, "xla_d": "LIBRARY_FUSION_TYPE_DOT", "xla_e": ""}


@pytest.mark.parametrize("text, fix", [("fast_math=true", "'name=value"), ("xla_cpu_enable_fast_math", "'name=value"),
                                       ("auto,xla_a=1", "'name=value"), (None, "must be a string.*'auto'")])
def test_a_malformed_setting_names_the_field_when_the_arguments_are_built(text, fix):
    with pytest.raises(ArgumentError, match=f"compiler_options.*{fix}"):
        TrainingArguments(compiler_options=text)


@pytest.mark.parametrize("vendor, expected", [("AuthenticAMD", {YNN: ""}), ("GenuineIntel", {}), (None, {})])
def test_auto_gives_the_measured_cpu_default_of_the_vendor_and_nothing_elsewhere(monkeypatch, vendor, expected):
    monkeypatch.setattr(compiler_options, "cpu_vendor", lambda: vendor)
    assert compiler_options.for_platform("auto", "cpu") == expected
    assert compiler_options.for_platform("auto", "gpu") == {}
    assert compiler_options.for_platform("", "cpu") == {}


def test_the_cpu_vendor_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n\nprocessor\t: 1\n")
    assert compiler_options.read_cpu_vendor(str(cpuinfo)) == "GenuineIntel"
    assert compiler_options.read_cpu_vendor(str(tmp_path / "absent")) is None  # macOS, Windows: no such file


def test_auto_drops_a_default_this_xla_does_not_know(monkeypatch):
    monkeypatch.setattr(compiler_options, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setitem(compiler_options.CPU_VENDOR_DEFAULTS, "AuthenticAMD",
                        {"xla_cpu_option_from_another_version": True, YNN: ""})
    assert compiler_options.for_platform("auto", "cpu") == {YNN: ""}


def test_an_option_xla_refuses_fails_when_the_trainer_is_built(tmp_path):
    for setting, refused in (("xla_cpu_no_such_option=1", "No such compile option"),
                             (f"{YNN}=NOT_A_FUSION_TYPE", "not a valid enum value")):
        with pytest.raises(ArgumentError, match=f"compiler_options: XLA \\(cpu\\) refused .*{refused}"):
            BaseTrainer(tiny_args(tmp_path, compiler_options=setting))
    assert not (tmp_path / "run" / "checkpoints").exists()


def compiled_train_step(trainer: BaseTrainer) -> str:
    trainer.setup()
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    return trainer.functions.train_step.lower(trainer.state, batch).compile().as_text()


def test_the_options_reach_the_compiled_train_step_and_keep_its_values(tmp_path, monkeypatch):
    """XLA's defaults hand the step's matmuls to YNNPACK; 'auto' on an AMD CPU compiles them without it. Both
    runs train to the same losses (up to the float32 rounding of another matmul kernel)."""
    monkeypatch.setattr(compiler_options, "cpu_vendor", lambda: "AuthenticAMD")
    default = BaseTrainer(tiny_args(tmp_path / "xla", compiler_options=""))
    tuned = BaseTrainer(tiny_args(tmp_path / "auto"))
    assert default.compiler_options == {} and tuned.compiler_options == {YNN: ""}
    assert "__ynn_fusion" in compiled_train_step(default)
    assert "__ynn_fusion" not in compiled_train_step(tuned)
    losses = [trainer.train()["loss"] for trainer in (default, tuned)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
