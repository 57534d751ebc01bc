"""Optimizer and learning-rate schedule from `TrainingArguments`, built with optax.

The schedule is a pure function of the optimizer-update count, so gradient accumulation never
shifts warmup or decay.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from easytrain.adafactor import adafactor
from easytrain.arguments import TrainingArguments
from easytrain.models.scan import is_stacked_path
from easytrain.norms import global_norm


def warmup_steps(args: TrainingArguments, total_steps: int) -> int:
    """`warmup_steps` cut to the run's length, else `warmup_ratio` of it rounded down, the product's float error
    first rounded off: 0.29 of 100 is 29 (the float product is 28.999999999999996), 1/3 of 3 is 1."""
    if args.warmup_steps > 0:
        return min(args.warmup_steps, total_steps)
    return math.floor(round(args.warmup_ratio * total_steps, 6))


def schedule_record(args: TrainingArguments, total_steps: int) -> dict[str, int]:
    """What `build_schedule` resolves `args` to, in updates: each checkpoint records it, so a resume under the same
    arguments can tell a schedule this easytrain computes otherwise (another rounding of `warmup_ratio`)."""
    return {"warmup_updates": int(warmup_steps(args, total_steps)), "total_updates": int(total_steps)}


def build_schedule(args: TrainingArguments, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then constant, linear or cosine decay to 0 at `total_steps`."""
    peak = args.learning_rate
    warmup = warmup_steps(args, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if args.lr_scheduler_type == "constant":
        decay = optax.constant_schedule(peak)
    elif args.lr_scheduler_type == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup])


def decay_mask(params: optax.Params) -> optax.Params:
    """Weight decay applies to matrices only, never to norm scales or biases; a layer's variable stored stacked
    (`easytrain.models.scan`) has one more axis than the layer's own."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - is_stacked_path(path) > 1, params)


#: The arguments `state_switches` reads.
SWITCH_ARGUMENTS = ("optimizer", "max_grad_norm", "weight_decay", "sgd_momentum")


def state_switches(arguments: Mapping[str, Any]) -> dict[str, bool]:
    """Which optional steps that own a part of the optimizer state `build_optimizer` chains for `arguments` (a
    run's, or the ones a checkpoint stored), keyed by the argument that switches each: gradient clipping
    (`max_grad_norm` > 0), Adafactor's weight-decay step (`weight_decay` != 0) and SGD's momentum trace
    (`sgd_momentum` != 0). Another value of such an argument changes numbers only; another switch changes the
    state's tree, so a resume compares these. An argument `arguments` lacks (a checkpoint older than it) is left
    out. AdamW and Lion chain their decay whatever its value."""
    tests: dict[str, Callable[[Any], bool]] = {"max_grad_norm": lambda norm: norm > 0}
    if arguments.get("optimizer") == "adafactor":
        tests["weight_decay"] = bool
    elif arguments.get("optimizer") == "sgd":
        tests["sgd_momentum"] = bool
    return {name: test(arguments[name]) for name, test in tests.items() if name in arguments}


def build_optimizer(args: TrainingArguments, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clipping (if asked) chained before the chosen optimizer; `state_switches` decides each optional step."""
    switches = state_switches({name: getattr(args, name) for name in SWITCH_ARGUMENTS})
    wd = args.weight_decay
    if args.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
                          weight_decay=wd, mask=decay_mask)
    elif args.optimizer == "lion":
        opt = optax.lion(schedule, b1=args.adam_beta1, b2=args.adam_beta2, weight_decay=wd, mask=decay_mask)
    elif args.optimizer == "adafactor":
        opt = adafactor(schedule, weight_decay_rate=wd if switches["weight_decay"] else None,
                        weight_decay_mask=decay_mask)  # stacked: per layer
    else:
        opt = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask),
                          optax.sgd(schedule, momentum=args.sgd_momentum if switches["sgd_momentum"] else None))
    if switches["max_grad_norm"]:
        return optax.chain(clip_by_global_norm(args.max_grad_norm), opt)
    return opt


def checked_schedule(schedule: Any) -> Any:
    """`configure_schedule`'s result, refused at set-up unless it is a function of the update count: the train step
    calls it to apply and log the rate, so a number (which optax's optimizers take as a fixed rate) failed only inside
    the first step's trace, and a missing `return` (None) sent `scheduler` back into `setup` without end."""
    if callable(schedule):
        return schedule
    if schedule is None:
        raise TypeError("configure_schedule returned None: return the optax schedule it builds, a function of the "
                        "update count (e.g. `return optax.cosine_decay_schedule(...)`).")
    fix = f"optax.constant_schedule({schedule!r}) for a fixed rate" if isinstance(schedule, numbers.Real) else \
        "an optax schedule"
    raise TypeError(f"configure_schedule returned a {type(schedule).__name__} ({schedule!r}): the train step calls "
                    f"the schedule with the update count to apply and log the learning rate; return {fix}.")


def checked_optimizer(tx: Any) -> optax.GradientTransformation:
    """`configure_optimizer`'s result, refused at set-up unless it has optax's `init` and `update` (a forgotten
    `return` otherwise fails as an attribute error while the state is placed)."""
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"configure_optimizer returned a {type(tx).__name__}; return an optax "
                        "GradientTransformation built from the schedule it is given, e.g. optax.adamw(schedule).")
    return tx


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm`, reusing the norm the train step already has.

    The step computes `global_norm` of the gradients for its `grad_norm` metric and its non-finite guard,
    and hands it to the optimizer as the `grad_norm` extra argument (optax's `chain` forwards extra
    arguments), with the gradients it belongs to (`grad_norm_of`, added by `TrainState.apply_gradients`).
    The norm is reused only when the updates reaching this clip are those very arrays (it is first in the
    chain, or behind transformations that pass updates through); anywhere else, e.g. after `scale_by_adam`,
    it computes the norm of what it clips. Same rule (updates scaled to `max_norm` when their norm is not
    below it) and the same empty state as optax's, so checkpoints of either restore into the other.
    """
    def update(updates: Any, state: optax.EmptyState, params: Any = None, *, grad_norm: jax.Array | None = None,
               grad_norm_of: Any = None, **extra: Any) -> tuple[Any, optax.EmptyState]:
        del params, extra
        norm = grad_norm if grad_norm is not None and _same_arrays(updates, grad_norm_of) else global_norm(updates)
        keep = norm < max_norm
        return jax.tree.map(lambda u: jax.lax.select(keep, u, (u / norm.astype(u.dtype)) * max_norm), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def _same_arrays(tree: Any, other: Any) -> bool:
    """Whether two pytrees hold the very same array objects (inside a trace: the same tracers)."""
    leaves, other_leaves = jax.tree.leaves(tree), jax.tree.leaves(other)
    return len(leaves) == len(other_leaves) and all(a is b for a, b in zip(leaves, other_leaves))
