"""`initial_policy()`: the module exactly as this run's policy starts, before its first step (mixed into
`BaseTrainer`), for a frozen reference or a teacher-like entry of `configure_frozen`.

It is built the way the policy is: the module loaded from `model_name_or_path`, a copy of `model=`, or one
initialised like it (same seed, so equal values); then `adapt_module`, a subclass's override included (by default
the run's LoRA adapters, `lora_adapter_path`'s or fresh ones, and the policy's layout, `apply_switches`); then
`init_weights_from`'s weights, put in by the policy's own `_initial_weights`. It lives on the mesh, sharded by
`partition_rules`. Each source is read once: the policy placed after it takes copies of the values it read
(`_read_initial_weights` for `init_weights_from`, `_own_module` for `model_name_or_path`; the values themselves once
the initial policy is gone, as DPO's precomputing reference is). `model_name_or_path`'s read is kept only where the
initial policy holds its very arrays (not replaced by `init_weights_from`, nor stacked anew after LoRA's adapters):
else the policy reads it again, rather than the devices holding one more copy of the weights meanwhile.

A fixed entry is rebuilt on resume, not checkpointed, so the sources are read again: the run records what it read
(run_info `initial_policy`, `reference_weights`, `lora_adapter`: the records and checks DPO's reference has always
made, `initial_policy_checks`) and a resume that finds other values there is refused, naming the field and the fix.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from easytrain.errors import ArgumentError
from easytrain.models import from_pretrained
from easytrain.models.hf_io import CheckpointError
from easytrain.models.hf_load import resolve_checkpoint
from easytrain.state import TrainState
from easytrain.trainers import adapters, init_weights
from easytrain.trainers.initial_policy_checks import (FROZEN_REFERENCE, INITIAL_POLICY, LORA_ADAPTER,
                                                      REFERENCE_WEIGHTS, checked_adapter_values,
                                                      checked_reference_weights, with_initial_weights)
from easytrain.trainers.switches import apply_switches


class InitialPolicyHooks:
    """`initial_policy()` and the run_info records of the sources it read (`BaseTrainer` mixes it in)."""

    #: How error messages name the initial policy's use (DPO: "DPO reference").
    initial_policy_subject: str = FROZEN_REFERENCE
    #: run_info `initial_policy`: the `init_weights_from` source read and the digests of what it gave.
    initial_policy_record: dict[str, Any] | None = None
    #: run_info `reference_weights`: the model directory a fixed initial policy was read from, and its digests.
    reference_weights: dict[str, Any] | None = None
    #: run_info `lora_adapter`: `lora_adapter_path`'s adapter values as read for the initial policy.
    adapter_read: dict[str, Any] | None = None
    #: `init_weights_from`'s variables as read for the initial policy, until the policy takes copies of them.
    _source_weights: Any = None
    #: `model_name_or_path`'s module as read for the initial policy (before its layout), until the policy takes it.
    _read_module: nnx.Module | None = None
    #: Whether the initial policy still holds `_read_module`'s arrays, so the policy takes copies of them.
    _read_module_shared: bool = True

    def initial_policy(self) -> nnx.Module:
        """A new module holding exactly the weights this run's policy starts from (before step 1), in its layout
        and on the mesh: call it in `configure_frozen`, `Frozen(self.initial_policy(), checkpoint=False,
        copy=False)` (its arrays are its own, a `model=` module's copied). One more copy of the weights on the
        devices, the LoRA base included (not shared with the policy's). A resume reads its sources again
        (`model_name_or_path`, `init_weights_from`, `lora_adapter_path`) and refuses one whose values changed. After
        set-up it is refused for a module passed as `model=`, which by then holds the trained weights."""
        module = self._initial_policy_module(checkpointed=False)
        if self._model is not None:  # called after set-up: no policy is left to take the values it read
            self._source_weights = None
        return module

    def _initial_policy_module(self, *, checkpointed: bool) -> nnx.Module:
        """`initial_policy()`; `checkpointed`: for an entry that changes and is restored on resume (TR-DPO's), so
        nothing is recorded of its sources, and a resume reads no `init_weights_from` (the restore replaces it)."""
        args = self._arguments
        if path := args.model_name_or_path:
            try:
                path = resolve_checkpoint(path)
            except CheckpointError as error:
                raise ArgumentError("model_name_or_path", str(error)) from error
            module = from_pretrained(path, dtype=self.dtype, param_dtype=self.param_dtype, mesh=self.mesh,
                                     rules=self.partition_rules, scan_layers=args.scan_layers and self.lora is None)
            read = nnx.clone(module) if self._places_read_module else None  # the policy's load (`_own_module`)
            module = self._as_initial_policy(module, checkpointed=checkpointed)
            if read is not None:  # kept only at no device memory: else the policy reads the directory itself
                self._read_module, self._read_module_shared = (read if _holds_arrays_of(module, read) else None), True
            if not checkpointed and not args.init_weights_from:  # rebuilt from `path` on resume: checked
                self.reference_weights = checked_reference_weights(
                    module, field="model_name_or_path", read_from=path, resume_from=self._resume_from,
                    subject=self.initial_policy_subject)
            return module
        if self._given_model is not None:  # copied: the step donates its own state, the caller keeps `model=`
            if self._model is not None:  # set up: `model=` is bound to the state the run trains
                raise ArgumentError("model", "the module passed as model= holds the trained weights once the trainer "
                                    "is set up, not the ones the run started from, so the initial policy cannot be "
                                    "copied from it now. Build it at set-up (configure_frozen: Frozen(self."
                                    "initial_policy(), ...)); for DPO's precomputed reference log-probs of an "
                                    "evaluation set, pass the set as dataset_eval= when the trainer is built (they "
                                    "are computed at set-up); or give the model as model_name_or_path (read again).")
            return _with_copied_arrays(self._as_initial_policy(nnx.clone(self._given_model),
                                                               checkpointed=checkpointed))
        return self._as_initial_policy(self.initial_module(), checkpointed=checkpointed)

    @property
    def _places_read_module(self) -> bool:
        """Whether set-up has yet to place the policy loaded from `model_name_or_path` (`_own_module`): a fresh
        run's, or a LoRA resume's base (a resume restores the rest), and not a `model=` module."""
        return self._model is None and self._given_model is None and (self._resume_from is None
                                                                       or self.lora is not None)

    def _own_module(self) -> nnx.Module:
        """Also: where the initial policy read `model_name_or_path` first, the policy is built from the module it
        read (the directory is read once), from device copies of its arrays while the initial policy holds them
        (the train step donates the policy's buffers)."""
        module, self._read_module = self._read_module, None
        if module is None:
            return super()._own_module()
        return _with_copied_arrays(module) if self._read_module_shared else module

    def _as_initial_policy(self, module: nnx.Module, *, checkpointed: bool = False) -> nnx.Module:
        """The initial policy from `module`, its base, built as the policy is (`_place_module`): through
        `adapt_module`, a subclass's override included (the run's adapters, `lora_adapter_path`'s values, the
        policy's layout), then with `init_weights_from`'s weights. A resumed checkpointed entry is restored: its
        source is not read."""
        args, resuming = self._arguments, self._resume_from is not None
        from_source = bool(args.init_weights_from) and not (checkpointed and resuming)
        module = self.adapt_module(module)
        if args.lora_adapter_path:  # read again on resume: refused if other values are there now
            values = nnx.to_pure_dict(nnx.state(module, self.trainable_filter))
            self.adapter_read = checked_adapter_values(values, adapter_path=args.lora_adapter_path, config=self.lora,
                                                       resume_from=self._resume_from,
                                                       subject=self.initial_policy_subject)
        if not from_source:
            return module
        module, self.initial_policy_record = with_initial_weights(
            module, self._read_initial_weights, source=args.init_weights_from, resume_from=self._resume_from,
            seed=args.seed, mesh=self.mesh, rules=self.partition_rules,
            filters=adapters.partition(self.lora, self.trainable), subject=self.initial_policy_subject)
        return module

    def _like_the_policy(self, module: nnx.Module) -> nnx.Module:
        """`module` with the policy's model switches (`scan_layers`, `attention_implementation`, `remat`): its layers
        stored as the policy's (an entry mixed with it leaf by leaf must match) and run by the same kernels (DPO's
        `ref_model_name_or_path`: another model, so no `adapt_module`)."""
        apply_switches(module, self._arguments, self.mesh.devices.flat[0].platform)
        return module

    def _initial_weights(self, state: TrainState, shardings: TrainState) -> TrainState:
        """Also: where `initial_policy()` read `init_weights_from` first, the policy takes copies of those values
        (the source is read once)."""
        if self._source_weights is None:
            return super()._initial_weights(state, shardings)
        state = self._read_initial_weights(state, shardings)
        self._source_weights = None
        return state

    def _read_initial_weights(self, state: TrainState, shardings: TrainState, *, copy: bool = True) -> TrainState:
        """`init_weights_from`'s weights in `state`, read from the source by the first caller only (the initial
        policy), then put in from those values (another copy, the policy): in copies of them with `copy`, since the
        train step donates the state and a buffer a frozen entry shares with the policy would be lost to it."""
        if self._source_weights is not None:
            placed = init_weights.put_weights(state, shardings, self._source_weights, copy=copy)
            if placed is not None:
                return placed
        initialised = super()._initial_weights(state, shardings)
        self._source_weights = init_weights.replaced_weights(state, initialised)
        return initialised

    def run_info(self) -> dict[str, Any]:
        """Also what the initial policy was read from (checked again on resume), where it was built."""
        records = {INITIAL_POLICY: self.initial_policy_record, LORA_ADAPTER: self.adapter_read,
                   REFERENCE_WEIGHTS: self.reference_weights}
        return {**super().run_info(), **{key: value for key, value in records.items() if value is not None}}


def _holds_arrays_of(module: nnx.Module, read: nnx.Module) -> bool:
    """Whether `module` holds every array of `read`, so keeping `read` holds nothing more on the devices. Not where
    the initial policy replaced or re-laid out what was read (`init_weights_from`'s weights, LoRA's layers stacked
    after the adapters are added): kept, those would be one more copy of the weights for as long as the reference is
    used (DPO's whole precomputed pass). Decided on the arrays' identity, the same in every process."""
    held = {id(leaf) for leaf in jax.tree.leaves(nnx.state(module))}
    return all(id(leaf) in held for leaf in jax.tree.leaves(nnx.state(read)))


def _with_copied_arrays(module: nnx.Module) -> nnx.Module:
    """`module` holding device copies of its arrays (same values and shardings), buffers no other module shares: one
    transfer of them all, not a copy compiled per leaf shape (in one process; an array spanning processes is copied by
    JAX's own small program per shape and sharding, as `leaf.copy()` was)."""
    leaves, tree = jax.tree.flatten(nnx.state(module))
    arrays = [leaf for leaf in leaves if isinstance(leaf, jax.Array)]
    copies = iter(jax.device_put(arrays, [leaf.sharding for leaf in arrays], may_alias=False))
    nnx.update(module, jax.tree.unflatten(tree, [next(copies) if isinstance(leaf, jax.Array) else leaf
                                                 for leaf in leaves]))
    return module
