"""DPO started with `init_weights_from` (e.g. SFT, then DPO from the SFT run's checkpoint): every reference that
means "the initial policy" is the policy after those weights, so the first step's loss is ln 2 with zero rewards,
and a resume rebuilds that reference exactly or refuses with the field named."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from dpo_fixtures import stopped_copy
from easytrain import ArgumentError
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from runs import StopAt, logged
from test_dpo_trainer import tiny_args
from test_lora_trainer import write_base

LORA = dict(lora_rank=4, lora_alpha=8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A base model and the output_dirs of three 3-step DPO runs to start from (a checkpoint at every step): full
    fine-tuning over the base, full fine-tuning from scratch (no model_name_or_path), LoRA over the base (non-zero
    adapters)."""
    root = tmp_path_factory.mktemp("sources")
    base = write_base(root / "base")
    found = {"base": base}
    for name, common in (("full", dict(model_name_or_path=str(base))), ("scratch", {}),
                         ("lora", dict(model_name_or_path=str(base), **LORA))):
        DPOTrainer(tiny_args(root / name, max_steps=3, save_strategy="steps", save_steps=1, **common)).train()
        found[name] = root / name / "run"
    return found


def assert_starts_at_the_reference(output_dir: Path) -> None:
    assert logged(output_dir)[1] == pytest.approx(np.log(2), abs=1e-6), "first-step loss"
    for name in ("rewards/chosen", "rewards/rejected"):
        assert logged(output_dir, name)[1] == pytest.approx(0.0, abs=1e-6), name


def test_online_reference_is_the_initial_policy_and_a_resume_keeps_it(sources, tmp_path):
    """Measured before: 0.66238 (the reference was model_name_or_path's weights)."""
    common = dict(model_name_or_path=str(sources["base"]), init_weights_from=str(sources["full"]), max_steps=2,
                  save_strategy="steps", save_steps=1)
    DPOTrainer(tiny_args(tmp_path / "straight", **common)).train()
    assert_starts_at_the_reference(tmp_path / "straight" / "run")
    stopped_copy(tmp_path / "straight" / "run", tmp_path / "cut" / "run", step=1)
    DPOTrainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **common)).train()
    assert logged(tmp_path / "cut" / "run") == logged(tmp_path / "straight" / "run")


def test_without_a_base_online_and_precomputed_references_are_the_initial_policy(sources, tmp_path):
    """Measured before: 0.66931 online and precomputed (the reference was `initial_module()`, the seed's weights)."""
    common = dict(init_weights_from=str(sources["scratch"]), max_steps=1)
    DPOTrainer(tiny_args(tmp_path / "online", **common)).train()
    DPOTrainer(tiny_args(tmp_path / "pre", **common), DPOArguments(precompute_ref_log_probs=True)).train()
    for run in ("online", "pre"):
        assert_starts_at_the_reference(tmp_path / run / "run")


def test_precomputed_reference_is_the_initial_policy_and_its_cache_follows_the_source(sources, tmp_path):
    """Measured before: 0.66238. The cache is keyed by the reference's weights: reused for the same source, not for
    another one (here the base itself, an exported model directory)."""
    options = DPOArguments(precompute_ref_log_probs=True)
    common = dict(model_name_or_path=str(sources["base"]), max_steps=1)
    first = DPOTrainer(tiny_args(tmp_path, init_weights_from=str(sources["full"]), **common), options)
    first.train()
    assert_starts_at_the_reference(tmp_path / "run")
    again = DPOTrainer(tiny_args(tmp_path, init_weights_from=str(sources["full"]), overwrite_output_dir=True,
                                 **common), options)
    again.setup()
    assert again.reference_logps_cached == {"train": True, "validation": True}, "same source: cached"
    other = DPOTrainer(tiny_args(tmp_path, init_weights_from=str(sources["base"]), overwrite_output_dir=True,
                                 **common), options)
    other.setup()
    assert other.reference_logps_cached == {"train": False, "validation": False}, "other source: recomputed"


def test_tr_dpo_reference_starts_at_the_initial_policy_and_resumes_without_the_source(sources, tmp_path):
    """The moving reference is checkpointed: a resume restores it and reads no source."""
    source = shutil.copytree(sources["scratch"], tmp_path / "source")
    common = dict(init_weights_from=str(source), max_steps=2, save_strategy="steps", save_steps=1)
    options = DPOArguments(sync_ref_model=True, ref_model_sync_steps=2)
    trainer = DPOTrainer(tiny_args(tmp_path, **common), options, callbacks=[StopAt(1)])
    reference = trainer.state.frozen["reference"]
    for ours, policy in zip(jax.tree.leaves(reference), jax.tree.leaves(trainer.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(policy))
    trainer.train()
    assert_starts_at_the_reference(tmp_path / "run")
    shutil.rmtree(source)
    DPOTrainer(tiny_args(tmp_path, resume_from_checkpoint="latest", **common), options).train()
    assert set(logged(tmp_path / "run")) == {1, 2}


def test_lora_reference_is_the_base_with_the_initial_adapters_and_a_resume_keeps_it(sources, tmp_path):
    """Measured before: 0.68602 (the adapters-off reference was the bare base, not base + the source's adapters)."""
    common = dict(model_name_or_path=str(sources["base"]), init_weights_from=str(sources["lora"]), max_steps=2,
                  save_strategy="steps", save_steps=1, **LORA)
    online = DPOTrainer(tiny_args(tmp_path / "straight", **common))
    online.train()
    DPOTrainer(tiny_args(tmp_path / "pre", **{**common, "max_steps": 1}),
               DPOArguments(precompute_ref_log_probs=True)).train()
    for run in ("straight", "pre"):
        assert_starts_at_the_reference(tmp_path / run / "run")
    assert set(online.state.frozen) == {"initial_adapters"}, "a copy of the adapters, not of the base"
    stopped_copy(tmp_path / "straight" / "run", tmp_path / "cut" / "run", step=1)
    DPOTrainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **common)).train()
    assert logged(tmp_path / "cut" / "run") == logged(tmp_path / "straight" / "run")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_resume_refuses_a_source_gone_or_changed(sources, tmp_path, kind):
    """The reference is rebuilt from init_weights_from on resume (not checkpointed): gone, that is a clear error;
    other weights there (here the source run went on, so its latest checkpoint is another) are refused by the
    digests the run recorded, not silently taken as another reference, and the error names the checkpoint read at
    the start, which resumes."""
    source = tmp_path / "source"
    shutil.copytree(sources[kind], source)
    shutil.rmtree(source / "checkpoints" / "3")  # the source run at step 2
    common = dict(model_name_or_path=str(sources["base"]), init_weights_from=str(source), max_steps=2,
                  save_strategy="steps", save_steps=1, **(LORA if kind == "lora" else {}))
    DPOTrainer(tiny_args(tmp_path, **common), callbacks=[StopAt(1)]).train()
    shutil.rmtree(source)
    with pytest.raises(ArgumentError, match="init_weights_from.*no longer exists"):
        DPOTrainer(tiny_args(tmp_path, resume_from_checkpoint="latest", **common)).setup()
    shutil.copytree(sources[kind], source)  # the source run went on: its latest checkpoint is step 3
    started_from = source.absolute() / "checkpoints" / "2"
    with pytest.raises(ArgumentError, match=f"init_weights_from.*differ.*--init_weights_from {started_from} "):
        DPOTrainer(tiny_args(tmp_path, resume_from_checkpoint="latest", **common)).setup()
    named = {**common, "init_weights_from": str(started_from)}
    DPOTrainer(tiny_args(tmp_path, resume_from_checkpoint="latest", **named)).train()
    assert set(logged(tmp_path / "run")) == {1, 2}


def test_an_explicit_reference_model_stays_what_it_names(sources, tmp_path):
    base = str(sources["base"])
    trainer = DPOTrainer(tiny_args(tmp_path / "a", model_name_or_path=base, init_weights_from=str(sources["full"])),
                         DPOArguments(ref_model_name_or_path=base))
    fresh = DPOTrainer(tiny_args(tmp_path / "b", model_name_or_path=base))
    reference, from_base = jax.tree.leaves(trainer.state.frozen["reference"]), jax.tree.leaves(fresh.state.params)
    assert any(not np.array_equal(p, b) for p, b in zip(jax.tree.leaves(trainer.state.params), from_base))
    for ours, theirs in zip(reference, from_base):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_lora_with_stacked_layers_builds_the_reference_as_the_policy(sources, tmp_path):
    """`scan_layers`: the adapters go on separate layers, which are then stacked, for the reference as for the policy
    (online and precomputed), so the LoRA source's adapters land where the policy's do."""
    common = dict(model_name_or_path=str(sources["base"]), init_weights_from=str(sources["lora"]), scan_layers=True,
                  max_steps=1, **LORA)
    for name, dpo in (("online", DPOArguments()), ("precomputed", DPOArguments(precompute_ref_log_probs=True))):
        DPOTrainer(tiny_args(tmp_path / name, **common), dpo).train()
        assert_starts_at_the_reference(tmp_path / name / "run")


def change_one_layer_weight(model_dir: Path) -> None:
    """`model_dir`'s weights with one decoder layer's query projection moved: every other tensor as it was."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.q_proj.weight"] += 0.5
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("field", ["init_weights_from", "ref_model_name_or_path"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["stacked then not", "not then stacked"])
def test_a_resume_with_the_other_scan_layers_still_refuses_changed_reference_weights(sources, tmp_path, field,
                                                                                      scan_layers):
    """Full fine-tuning may resume with the other `scan_layers`; the reference's digests name each layer's tensors in
    both layouts, so a layer's weights changed at the reference's path are still refused. Measured before: the
    stacked digests shared no name with the per-layer ones, and the changed reference was taken without a word."""
    source = write_base(tmp_path / "source", seed=1)
    dpo = DPOArguments(ref_model_name_or_path=str(source)) if field == "ref_model_name_or_path" else DPOArguments()
    common = dict(model_name_or_path=str(sources["base"]), max_steps=2, save_strategy="steps", save_steps=1,
                  **({"init_weights_from": str(source)} if field == "init_weights_from" else {}))
    DPOTrainer(tiny_args(tmp_path, scan_layers=scan_layers, **common), dpo, callbacks=[StopAt(1)]).train()
    resume = dict(common, scan_layers=not scan_layers, resume_from_checkpoint="latest")
    DPOTrainer(tiny_args(tmp_path, **resume), dpo).setup()  # the same weights in the other layout: accepted
    change_one_layer_weight(source)
    with pytest.raises(ArgumentError, match=f"{field}.*differ.*1 tensor.*layers.*q_proj"):
        DPOTrainer(tiny_args(tmp_path, **resume), dpo).setup()
