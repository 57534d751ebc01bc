"""A DPO reference is its weights and its architecture: the same weights under another config.json (RoPE theta, norm
epsilon) give other log-probs. Precomputed reference log-probs are cached under both, so a reference whose config
changed is recomputed, and a fixed reference rebuilt from its path on resume is refused when its config changed
since the run started (a checkpoint written before the architecture was recorded still resumes)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from easytrain import ArgumentError
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from easytrain.trainers.initial_policy_checks import REFERENCE_WEIGHTS
from runs import StopAt, logged
from test_dpo_trainer import tiny_args
from test_lora_trainer import write_base


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"policy": write_base(root / "policy"), "reference": write_base(root / "reference", seed=1)}


def change_architecture(model_dir: Path) -> None:
    """`model_dir`'s config.json with another RoPE theta and RMSNorm epsilon: every weight as it was."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if "rope_parameters" in config:
        config["rope_parameters"]["rope_theta"] = 3.0
    config["rope_theta"] = 3.0
    config["rms_norm_eps"] = 0.5
    path.write_text(json.dumps(config))


def options(how: str, reference: Path, **more) -> DPOArguments:
    return DPOArguments(ref_model_name_or_path=str(reference) if how == "explicit" else None, **more)


@pytest.mark.parametrize("how", ["default", "explicit"])
def test_precomputed_log_probs_are_recomputed_when_the_reference_config_changed(bases, tmp_path, how):
    """Measured before: the cache was read (cached True) and the default reference's first step logged 0.579,
    not ln 2 (the edited reference against log-probs of the unedited one)."""
    model = shutil.copytree(bases["policy"], tmp_path / "model")
    reference = shutil.copytree(bases["reference"], tmp_path / "reference")
    common = dict(model_name_or_path=str(model), max_steps=1, overwrite_output_dir=True)
    dpo = options(how, reference, precompute_ref_log_probs=True)
    DPOTrainer(tiny_args(tmp_path, **common), dpo).setup()
    change_architecture(reference if how == "explicit" else model)
    edited = DPOTrainer(tiny_args(tmp_path, **common), dpo)
    edited.train()
    assert edited.reference_logps_cached == {"train": False, "validation": False}, "other architecture: recomputed"
    if how == "default":
        assert logged(tmp_path / "run")[1] == pytest.approx(np.log(2), abs=1e-6)
    again = DPOTrainer(tiny_args(tmp_path, **common), dpo)
    again.setup()
    assert again.reference_logps_cached == {"train": True, "validation": True}, "same architecture: cached"
    if how == "explicit":  # the same model in another directory: the same key
        moved = shutil.copytree(reference, tmp_path / "moved")
        elsewhere = DPOTrainer(tiny_args(tmp_path, **common), options(how, moved, precompute_ref_log_probs=True))
        elsewhere.setup()
        assert elsewhere.reference_logps_cached == {"train": True, "validation": True}, "moved: cached"


def test_the_cache_follows_switches_that_change_numbers_only(bases, tmp_path):
    """`remat_policy` changes no forward pass: the cache is read. Another attention kernel may change the last bits
    of every log-prob: recomputed."""
    common = dict(model_name_or_path=str(bases["policy"]), max_steps=1, overwrite_output_dir=True)
    dpo = DPOArguments(precompute_ref_log_probs=True)
    DPOTrainer(tiny_args(tmp_path, **common), dpo).setup()
    remat = DPOTrainer(tiny_args(tmp_path, remat_policy="full", **common), dpo)
    remat.setup()
    assert remat.reference_logps_cached == {"train": True, "validation": True}, "remat: the same numbers"
    kernel = DPOTrainer(tiny_args(tmp_path, attention_implementation="dot_product_attention", **common), dpo)
    kernel.setup()
    assert kernel.reference_logps_cached == {"train": False, "validation": False}, "another attention kernel"


def cut_run(bases, tmp_path, how: str) -> tuple[dict, DPOArguments, Path]:
    """A run over copies of the bases stopped (checkpointed) after step 1; its arguments, options and the directory
    its reference is read from."""
    model = shutil.copytree(bases["policy"], tmp_path / "model")
    reference = shutil.copytree(bases["reference"], tmp_path / "reference") if how == "explicit" else model
    common = dict(model_name_or_path=str(model), max_steps=2, save_strategy="steps", save_steps=1)
    dpo = options(how, reference)
    DPOTrainer(tiny_args(tmp_path, **common), dpo, callbacks=[StopAt(1)]).train()
    return dict(common, resume_from_checkpoint="latest"), dpo, reference


@pytest.mark.parametrize("how", ["default", "explicit"])
def test_a_resume_refuses_a_reference_whose_config_changed(bases, tmp_path, how):
    """Measured before: the explicit reference with the edited config.json was taken without a word (the default
    reference is model_name_or_path, whose architecture the policy's own record checks too)."""
    resume, dpo, reference = cut_run(bases, tmp_path, how)
    DPOTrainer(tiny_args(tmp_path, **resume), dpo).setup()  # the same reference: accepted
    change_architecture(reference)
    field = "ref_model_name_or_path" if how == "explicit" else "(model_name_or_path|model_config)"  # whichever first
    with pytest.raises(ArgumentError, match=f"{field}.*rms_norm_eps"):
        DPOTrainer(tiny_args(tmp_path, **resume), dpo).setup()


def test_a_resume_from_before_the_architecture_was_recorded_is_accepted(bases, tmp_path):
    resume, dpo, reference = cut_run(bases, tmp_path, "explicit")
    stored = tmp_path / "run" / "checkpoints" / "1" / "run_info" / "metadata"
    run_info = json.loads(stored.read_text())
    assert "architecture" in run_info[REFERENCE_WEIGHTS], run_info[REFERENCE_WEIGHTS].keys()
    del run_info[REFERENCE_WEIGHTS]["architecture"]
    stored.write_text(json.dumps(run_info))
    change_architecture(reference)  # nothing recorded to compare it with
    DPOTrainer(tiny_args(tmp_path, **resume), dpo).train()
