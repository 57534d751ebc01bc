"""Work a DPO set-up from a model directory does once, not again: `model_name_or_path` is read once for the policy
and a reference that is the initial policy (the policy takes a device copy of what the reference read, never its
buffers, which the train step donates), and the reference's weights are digested once (their resume record is also
the frozen entry's, or the precomputed log-probs' cache key). Counted, not timed; a resume still reads the
directory again for its checks, and the runs are those whose policy reads the directory itself."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_fixtures import stopped_copy
from easytrain import frozen, integrity
from easytrain.models import from_pretrained, hf_load
from easytrain.trainers import initial_policy
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from easytrain.trainers.initial_policy import InitialPolicyHooks
from easytrain.trainers.language_model import LanguageModelHooks
from runs import logged
from test_dpo_trainer import tiny_args
from test_lora_trainer import write_base

#: The tensors `write_base`'s model stores (embedding, head, final norm, 2 layers of 9).
TENSORS = 21


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"base": write_base(root / "base"), "other": write_base(root / "other", seed=1)}


def counted_reads(monkeypatch) -> dict[str, int]:
    """Directory name -> weight tensors read from it by every load from now on."""
    reads, headers, place = {}, hf_load.read_headers, hf_load._place
    at = []
    monkeypatch.setattr(hf_load, "read_headers", lambda directory: at.append(Path(directory).name) or headers(
        directory))
    monkeypatch.setattr(hf_load, "_place", lambda *a, **k: reads.update({at[-1]: reads.get(at[-1], 0) + 1}) or place(
        *a, **k))
    return reads


def counted_digests(monkeypatch) -> list[int]:
    """The leaves of each digest taken from now on."""
    digested, fingerprint = [], integrity.fingerprint
    monkeypatch.setattr(integrity, "fingerprint", lambda tree, *a, **k: digested.append(len(jax.tree.leaves(tree)))
                        or fingerprint(tree, *a, **k))
    return digested


def pointers(tree) -> set[int]:
    return {buffer.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree) for buffer in
            (shard.data for shard in leaf.addressable_shards)}


#: DPO options and run arguments of each kind of reference a run from `model_name_or_path` has.
CASES = {
    "online": ({}, {}),
    "precomputed": (dict(precompute_ref_log_probs=True), {}),
    "tr_dpo": (dict(sync_ref_model=True, ref_model_sync_steps=1), {}),
    "lora": ({}, dict(lora_rank=4)),
    "lora_precomputed": (dict(precompute_ref_log_probs=True), dict(lora_rank=4)),
    "stacked": ({}, dict(scan_layers=True)),
}


def reading_each_time(monkeypatch) -> None:
    """Every build reads the directory itself, as before the policy took the reference's read."""
    monkeypatch.setattr(InitialPolicyHooks, "_own_module", LanguageModelHooks._own_module, raising=False)


@pytest.mark.parametrize("case", list(CASES))
def test_the_model_directory_is_read_once_and_the_policy_owns_its_buffers(bases, tmp_path, monkeypatch, case):
    """Measured before: every tensor read twice (the reference's load, then the policy's), but under LoRA online
    (the reference is the policy with its adapters off). The run is the one whose policy reads the directory."""
    options, extra = CASES[case]
    common = dict(model_name_or_path=str(bases["base"]), max_steps=2, **extra)
    reads = counted_reads(monkeypatch)
    trainer = DPOTrainer(tiny_args(tmp_path / "once", **common), DPOArguments(**options))
    trainer.setup()
    assert reads == {"base": TENSORS}, reads
    if "reference" in trainer.state.frozen:
        assert not pointers(trainer.state.params) & pointers(trainer.state.frozen["reference"]), "shared buffers"
    trainer.train()
    reading_each_time(monkeypatch)
    DPOTrainer(tiny_args(tmp_path / "each", **common), DPOArguments(**options)).train()
    assert logged(tmp_path / "once" / "run") == logged(tmp_path / "each" / "run")


@pytest.mark.parametrize("case", ["online", "precomputed"])
def test_the_reference_weights_are_digested_once(bases, tmp_path, monkeypatch, case):
    """Measured before: twice, for its resume record (`reference_weights`) and then for the frozen entry's
    fingerprint or the precomputed log-probs' cache key, of the same arrays. Both are the digests taken again."""
    options = DPOArguments(**CASES[case][0])
    args = tiny_args(tmp_path, model_name_or_path=str(bases["base"]), max_steps=1)
    fingerprint, digested = integrity.fingerprint, counted_digests(monkeypatch)
    trainer = DPOTrainer(args, options)
    trainer.setup()
    assert digested == [TENSORS], digested
    monkeypatch.setattr(frozen, "given_digests", lambda spec, values: None, raising=False)  # digested again
    if case == "online":
        recorded = trainer.run_info()["frozen_fingerprints"]["reference"]
        assert recorded == trainer.run_info()["reference_weights"]["fingerprint"]
        assert recorded == fingerprint(trainer.state.frozen["reference"], integrity.SMALL_ON_HOST)
    else:  # the same cache key: a run digesting the reference again finds the log-probs this one cached
        again = DPOTrainer(args, options)
        again.setup()
        assert trainer.reference_logps_cached == {"train": False, "validation": False}
        assert again.reference_logps_cached == {"train": True, "validation": True}


def test_an_explicit_reference_reads_each_directory_once(bases, tmp_path, monkeypatch):
    reads, digested = counted_reads(monkeypatch), counted_digests(monkeypatch)
    trainer = DPOTrainer(tiny_args(tmp_path, model_name_or_path=str(bases["base"]), max_steps=1),
                         DPOArguments(ref_model_name_or_path=str(bases["other"])))
    trainer.setup()
    assert reads == {"base": TENSORS, "other": TENSORS}, reads
    assert digested == [TENSORS], digested


@pytest.mark.parametrize("case", ["online", "lora_precomputed"])
def test_a_resume_reads_the_directory_once_for_its_checks(bases, tmp_path, monkeypatch, case):
    """A resume reads `model_name_or_path` again (its reference is rebuilt from it and checked); under LoRA the
    policy's base is placed from that read too. Measured before: twice under LoRA with precomputed log-probs."""
    options, extra = CASES[case]
    common = dict(model_name_or_path=str(bases["base"]), max_steps=2, save_strategy="steps", save_steps=1, **extra)
    DPOTrainer(tiny_args(tmp_path / "straight", **common), DPOArguments(**options)).train()
    stopped_copy(tmp_path / "straight" / "run", tmp_path / "cut" / "run", step=1)
    reads = counted_reads(monkeypatch)
    resumed = DPOTrainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **common),
                         DPOArguments(**options))
    resumed.train()
    assert reads == {"base": TENSORS}, reads
    assert logged(tmp_path / "cut" / "run") == logged(tmp_path / "straight" / "run")


def test_the_policys_copy_of_what_the_reference_read_lowers_no_program(bases):
    """The device copy the policy takes is a transfer, not a program per leaf shape (measured before: one lowered
    and compiled copy per distinct shape, 7 for this model, at each process's first copy of them)."""
    module = from_pretrained(bases["base"], param_dtype=jnp.bfloat16)
    before = nnx.to_pure_dict(nnx.state(nnx.clone(module)))
    jax.clear_caches()
    lowered = []
    listen = lambda event, duration, **fields: lowered.append(fields.get("fun_name")) if (  # noqa: E731
        event == "/jax/core/compile/jaxpr_to_mlir_module_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        copied = nnx.to_pure_dict(nnx.state(initial_policy._with_copied_arrays(module)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert lowered == []
    assert not pointers(before) & pointers(copied), "shared buffers"
    jax.tree.map(lambda a, b: (a.sharding == b.sharding and a.dtype == b.dtype) or pytest.fail("layout"), before,
                 copied)
    jax.tree.map(np.testing.assert_array_equal, before, copied)


#: Runs whose reference holds other arrays than the ones read from `model_name_or_path` (stacked by LoRA's
#: `scan_layers` after its adapters are added, or replaced by `init_weights_from`'s), and some whose reference holds
#: the read ones themselves.
HELD_CASES = {
    "online": ({}, {}),
    "online_init_weights": ({}, dict(init_weights_from="other")),
    "precomputed": (dict(precompute_ref_log_probs=True), {}),
    "precomputed_init_weights": (dict(precompute_ref_log_probs=True), dict(init_weights_from="other")),
    "lora_precomputed": (dict(precompute_ref_log_probs=True), dict(lora_rank=4)),
    "lora_precomputed_stacked": (dict(precompute_ref_log_probs=True), dict(lora_rank=4, scan_layers=True)),
}


@pytest.mark.parametrize("case", list(HELD_CASES))
def test_what_the_policy_keeps_of_the_read_holds_no_buffer_the_reference_lacks(bases, tmp_path, monkeypatch, case):
    """The read kept for the policy costs no device memory: where the reference holds other arrays than those read
    (replaced, or stacked anew), keeping them would hold one more copy of the weights through the reference's use
    (the whole precomputed pass) than a policy that reads the directory itself. Measured before: all 21 read arrays
    kept beside the reference under init_weights_from, 18 (the layers') under LoRA with scan_layers."""
    options, extra = HELD_CASES[case]
    extra = {key: str(bases[value]) if key == "init_weights_from" else value for key, value in extra.items()}
    build, extra_held = InitialPolicyHooks._initial_policy_module, []

    def spied(self, **kwargs):
        module = build(self, **kwargs)
        kept = set() if self._read_module is None else pointers(nnx.state(self._read_module))
        extra_held.append(len(kept - pointers(nnx.state(module))))
        return module

    monkeypatch.setattr(InitialPolicyHooks, "_initial_policy_module", spied)
    trainer = DPOTrainer(tiny_args(tmp_path, model_name_or_path=str(bases["base"]), max_steps=1, **extra),
                         DPOArguments(**options))
    trainer.setup()
    assert extra_held == [0], extra_held
