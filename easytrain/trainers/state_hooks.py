"""Where a fresh or resumed run's train state comes from (mixed into `BaseTrainer`): a module placed on the mesh,
`init_weights_from`'s variables put in, or a checkpoint restored straight into the training layout.

The hooks keep their names: a trainer overrides `_initial_weights` and calls `super()` as before (`initial_policy`
does: where `initial_policy()` read `init_weights_from` first, the policy takes copies of those values).
"""

from __future__ import annotations

import functools
from typing import Any

import optax

from easytrain import integrity, placement
from easytrain.frozen import FrozenPlan
from easytrain.models import from_pretrained
from easytrain.state import TrainState
from easytrain.trainers import init_weights
from easytrain.trainers.resume import restore_checkpoint


class TrainStateHooks:
    """Placing, initialising and restoring the `TrainState` (`BaseTrainer.configure_model` chooses which)."""

    #: Whether a resume puts `init_weights_from`'s weights in as a fresh start does (DPO: under LoRA its reference is
    #: the policy's weights with the adapter values it started from, read again on resume, docs/dpo.md); otherwise a
    #: resume reads only the base its restore cannot bring back (an `initial_policy()` reads its own sources again).
    reads_init_source_on_resume: bool = False

    def _place_module(self, tx: optax.GradientTransformation, placed: dict[str, Any]) -> tuple[TrainState, Any]:
        """A fresh run's state: the given (copied) or own module adapted and placed, `init_weights_from` put in."""
        if self._given_model is not None:  # copied: the step donates its buffers, the caller keeps theirs
            state, shardings = placement.place_module(self.adapt_module(self._given_model), tx, **placed)
        else:
            state, shardings = placement.place_module(self.adapt_module(self._own_module()), tx, copy=False, **placed)
        if self._arguments.init_weights_from and (self._resume_from is None or self.reads_init_source_on_resume):
            state = self._initial_weights(state, shardings)
        elif self._arguments.init_weights_from:  # a LoRA resume: the restore brings back all but the base
            state = self._from_source(state, shardings, resuming=True)
        if state.base:  # what a resume must find again before it restores the adapters
            self.base_fingerprint = integrity.fingerprint(state.base, integrity.SMALL_ON_HOST)
        return state, shardings

    def _initial_weights(self, state: TrainState, shardings: TrainState) -> TrainState:
        """`init_weights_from`'s variables in place of the fresh ones (new LoRA adapters, and a base already
        loaded from `model_name_or_path`, may stay as they are)."""
        return self._from_source(state, shardings)

    def _from_source(self, state: TrainState, shardings: TrainState, *, resuming: bool = False) -> TrainState:
        """`_initial_weights`; `resuming`: only the base a LoRA resume cannot restore (`initialise_from`)."""
        load = functools.partial(from_pretrained, dtype=self.dtype, param_dtype=self.param_dtype, mesh=self.mesh,
                                 rules=self.partition_rules)
        keeps = lambda path, part: (self.lora is not None and path[-1] in ("lora_a", "lora_b")) or (
            part == "base" and bool(self._arguments.model_name_or_path))
        return init_weights.initialise_from(self._arguments.init_weights_from, state, shardings,
                                            load_pretrained=load, fresh_ok=keeps, resuming=resuming)

    def _restore(self, tx: optax.GradientTransformation, placed: dict[str, Any],
                 frozen: FrozenPlan) -> tuple[TrainState, Any]:
        """The resumed state, restored straight into its layout: full weights are never initialised (or loaded)
        only to be overwritten; a LoRA base is not in the checkpoint, so it is placed (and checked) first."""
        if self.lora is None:
            module = self.adapt_module(self._given_model) if self._given_model is not None else self._abstract_module()
            target, shardings = placement.abstract_train_state(module, tx, **placed)
            base = {}
        else:
            fresh, shardings = self._place_module(tx, placed)
            target, base = placement.abstract_state(shardings, fresh), fresh.base
        restored = restore_checkpoint(self._resume_from, self.run_info(), frozen.restore_target(target).checkpointed(),
                                      data_fingerprint=getattr(self._data.train, "fingerprint", None))
        self.resumed_data_state = restored.data_state
        self.callbacks.load_state_dict(restored.callbacks_state)
        return restored.state.replace(base=base), shardings
