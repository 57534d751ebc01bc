"""`BaseTrainer`: wires data, model, compiled steps, logging and checkpoints together.

The math lives in pure functions (`easytrain.steps`, `easytrain.losses`); this class only builds
them once and drives the loop. Each piece comes from one public hook a subclass may override: the
data (`prepare_datasets`, `collate`), the module (`create_module`, `trainable`, `configure_frozen`),
the objective (`compute_loss`), compiled functions (`compile_step`) and one iteration
(`train_iteration`). docs/custom_trainer.md says which to override for what. Mixed in: the protocol's
properties (`protocol_properties`), the module as the policy starts (`initial_policy`: a frozen reference), what a
run records (`run_record`), where its state comes from (`state_hooks`), the language-modelling defaults of the
data, module and loss hooks (`language_model`) and the claim of `output_dir` (`claim_hooks`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from easytrain import (compilation_cache, distributed, host_memory, memory_plan,
                       placement, profiling, sharding, steps, stop_signals)
from easytrain.arguments import TrainingArguments
from easytrain.callbacks import Callback, CallbackList
from easytrain.checkpoint import CheckpointManager
from easytrain.chunked_loss import chunking_problem
from easytrain.data import EvalBatches, TrainBatches
from easytrain.data.batch_checks import TOKEN_FIELDS
from easytrain.data.token_range import vocab_size_of
from easytrain.errors import ArgumentError
from easytrain.evaluators import Evaluator, usable_evaluators
from easytrain.frozen import Frozen, FrozenPlan
from easytrain.optim import build_optimizer, build_schedule, checked_optimizer, checked_schedule, schedule_record
from easytrain.protocol import ConfiguredDataloaders, ConfiguredFunctions, ConfiguredModel
from easytrain.state import TrainState, bind
from easytrain.trainers import (adapters, batch_fields, builders, data_agreement, preemption, process_failure, run_lock,
                                step_outputs, trainer_start)
from easytrain.trainers.claim_hooks import ClaimHooks
from easytrain.trainers.held_run import tracker_records
from easytrain.trainers.initial_policy import InitialPolicyHooks
from easytrain.trainers.language_model import LanguageModelHooks
from easytrain.trainers.loop import TrainLoop, evaluate_batches
from easytrain.trainers.loop_parts import LoopParts
from easytrain.trainers.protocol_properties import ProtocolProperties
from easytrain.trainers.resume import restore_step
from easytrain.trainers.restore_checks import check_run_length
from easytrain.trainers.run_record import RunRecordHooks, frozen_fingerprints
from easytrain.trainers.run_start import trackers_then_claim
from easytrain.trainers.state_hooks import TrainStateHooks
from easytrain.trainers.switches import apply_switches

logger = logging.getLogger("easytrain")


class BaseTrainer(ProtocolProperties, InitialPolicyHooks, RunRecordHooks, TrainStateHooks, LanguageModelHooks,
                  ClaimHooks):
    """Causal-LM training on one device, a mesh of devices, or many hosts.

    Args:
        arguments: every knob of the run; defaults train the embedded arithmetic task.
        model: an NNX module to train instead of building one from `arguments`.
        tokenizer: a Hugging Face tokenizer; by default loaded from `arguments`.
        dataset_train: a `datasets.Dataset` of raw text (or a `DatasetDict`).
        dataset_eval: the same, to evaluate on.
        callbacks: `Callback`s notified of train/step/log/evaluate/save events.
        evaluators: extra `Evaluator`s run by `evaluate()`; each returns a dict of metrics.

    Example:
        >>> trainer = BaseTrainer(TrainingArguments(output_dir="/tmp/run", max_steps=20))
        >>> trainer.train()["loss"]  # doctest: +SKIP
    """

    #: Logical parameter axis -> mesh axis (or axes, or None). Override for a model with other names.
    partition_rules: sharding.LogicalRules = sharding.DEFAULT_RULES
    #: Which variables get gradients and optimizer state (an NNX filter); all others stay frozen.
    trainable: nnx.filterlib.Filter = nnx.Param
    #: Batch fields kept on the host (bookkeeping), never sent to the device.
    host_only_fields: tuple[str, ...] = ("example_id",)
    #: Batch fields holding token ids, checked on the host against the model config's `vocab_size` (if it has one).
    token_fields: tuple[str, ...] = TOKEN_FIELDS
    #: The task's argument dataclasses, saved in arguments.json beside `TrainingArguments` (so `--config` on
    #: that file reruns the same job); `easytrain train --task` sets them, SFT and DPO set their own.
    task_arguments: tuple[Any, ...] = ()

    def __init__(self, arguments: TrainingArguments | None = None, *, model: nnx.Module | None = None,
                 tokenizer: Any = None, dataset_train: Any = None, dataset_eval: Any = None,
                 callbacks: Sequence[Callback] = (), evaluators: Sequence[Evaluator] = ()):
        self._arguments = arguments if arguments is not None else TrainingArguments()
        distributed.initialize(self._arguments)  # before any other JAX call
        self._given_model = model
        self.tokenizer = tokenizer
        self._raw_train, self._raw_eval = dataset_train, dataset_eval
        self.callbacks = CallbackList(builders.run_callbacks(self._arguments, list(callbacks)))
        self.evaluators: list[Evaluator] = list(evaluators)
        self.should_stop = False
        self.is_main_process = jax.process_index() == 0
        # check_inputs, output_dir, then self.lora, self.mesh and self.compiler_options, agreed by every process
        self._resume_from, cache_directory = trainer_start.agreed_start(self)
        host_memory.advise(self.mesh.devices.flat[0].platform)
        self.compilation_cache_dir = compilation_cache.use(cache_directory)
        self._data: ConfiguredDataloaders | None = None
        self._model: ConfiguredModel | None = None
        self._functions: ConfiguredFunctions | None = None
        self._schedule: optax.Schedule | None = None
        self._schedule_record: dict[str, int] | None = None  # what `configure_schedule` built, for run_info
        self._default_schedule: optax.Schedule | None = None  # the base's: the record is the run's only if it applies
        self._checkpoints: CheckpointManager | None = None
        self.model_config: Any = None
        self.base_fingerprint: dict[str, list[int]] | None = None  # of the frozen base under LoRA
        self.resumed_data_state: dict[str, Any] | None = None
        self.loop: TrainLoop | None = None

    def check_inputs(self) -> None:
        """Refuse what this trainer's own arguments alone refuse, and check the files they name (one process alone may
        fail to read one): called once, from `BaseTrainer.__init__`, first in the start every process agrees on
        (before the checkpoints are looked at), so the others name a failing process instead of waiting in a later
        collective, and a refusal leaves no output_dir made for it. Only what a subclass sets before
        `super().__init__()` exists then (not `self.lora`, `self.mesh`). Nothing here; SFT reads its chat template,
        DPO refuses arguments (`check_arguments_for_dpo`), reads its reference's config: overrides call super()."""

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Build data, model and compiled steps once, in that order (all checks before compute). A set-up that fails
        leaves `evaluators` as it found them, so a retry starts from the user's list as they leave it, without the
        defaults the failed attempt's data preparation added (they would count as passed: refused, or run twice)."""
        if self._functions is not None:
            return
        passed = list(self.evaluators)
        try:
            self._set_up(passed)
        except BaseException:
            self.evaluators[:] = passed
            raise

    def _set_up(self, passed: list[Evaluator]) -> None:
        """`setup`'s work; `passed`: the evaluators before it, the user's."""
        self.check_task_settings()  # JSON values only: each checkpoint records them (`run_record`)
        data_agreement.check_arguments_agree(self._arguments, self.task_arguments, jax.process_count())
        with stop_signals.interruptible("preparing the data"):  # a stop signal here ends train() at once
            self._data = self.configure_dataloaders()
        self._evaluators_from_rows = tuple(e for e in self.evaluators if all(e is not p for p in passed))
        given = (self._raw_train is not None, self._raw_eval is not None)
        data_agreement.check_processes_agree(self._data, self._arguments, given, jax.process_count())
        profiling.check_window(self._arguments, self._data.total_steps)  # the run's length is known from here
        # `scheduler`: configure_model may read it
        self._schedule = checked_schedule(self.configure_schedule(self._data.total_steps))
        with stop_signals.interruptible("building the model"):
            self._model = self.configure_model()
        self._settle_evaluators(self._model.model)  # the module trained, whatever built it: before any step
        self._state = self._model.state
        self._functions = self.configure_functions()
        names = builders.eval_metric_names(self._functions.eval_step, self._state, self._data.eval, self.mesh,
                                          self.host_only_fields)
        builders.check_eval_metrics(self._arguments, names, self.evaluators, has_eval_data=self._data.eval is not None)
        if self._arguments.save_pretrained_at_end and (problem := self.export_problem()):
            raise ArgumentError("save_pretrained_at_end", f"{problem}; pass --no_save_pretrained_at_end, or "
                                                          "override save_pretrained in your trainer.")

    #: The evaluators the trainer's data preparation added itself, not passed as `evaluators=` (`setup` records
    #: them): such a default is left out, not refused, where the module cannot run it.
    _evaluators_from_rows: tuple[Evaluator, ...] = ()

    def _settle_evaluators(self, module: Any) -> None:
        """Keep the evaluators `module` can run, decided at set-up rather than at the first evaluation (which would
        lose the steps before it): a generation evaluator on a module that cannot generate is refused, or left out
        with a warning if the rows added it unasked. `setup` settles on the module `configure_model` returned; the
        default one settles earlier, before any weight is placed."""
        self.evaluators[:] = usable_evaluators(self.evaluators, module, added=self._evaluators_from_rows,
                                               asked=self._arguments.eval_metrics)

    def configure_mesh(self) -> jax.sharding.Mesh:
        args = self._arguments
        return sharding.make_mesh(args.data_parallel_size, args.fsdp_size, args.tensor_parallel_size)

    def configure_dataloaders(self) -> ConfiguredDataloaders:
        """Prepare the rows, then wrap them in resumable per-host loaders that batch with `collate`."""
        args = self._arguments
        builders.check_batch_sizes(args, self.mesh)  # before the rows: a subclass may batch them (DPO's reference)
        self._dataset_train, self._dataset_eval = builders.prepared_rows(self)  # checked; given data read
        hosts = dict(collate=self.collate, process_index=jax.process_index(), process_count=jax.process_count(),
                     vocab_size=vocab_size_of(self.model_config), token_fields=self.token_fields)
        loader = TrainBatches(self._dataset_train, args.train_batch_size, seed=args.seed, **hosts)
        eval_hosts = dict(hosts, multiple_of=sharding.data_parallel_size(self.mesh))
        evaluation = None if self._dataset_eval is None else EvalBatches(self._dataset_eval, args.eval_batch_size,
                                                                         **eval_hosts)
        self._eval_batches = functools.partial(EvalBatches, global_batch_size=args.eval_batch_size, **eval_hosts)
        per_epoch = loader.steps_per_epoch
        total = args.max_steps if args.max_steps > 0 else per_epoch * args.num_train_epochs
        return ConfiguredDataloaders(loader, evaluation, per_epoch, total)

    # ------------------------------------------------------------------ model and state
    def configure_frozen(self) -> Mapping[str, Frozen]:
        """Named non-trainable state the loss receives as `frozen[name]` (a reference model, a teacher, an
        EMA copy); sharded by the same rules, never differentiated. Default: none. A reference that is the policy as
        it starts: `Frozen(self.initial_policy(), checkpoint=False, copy=False)`."""
        return {}

    @property
    def trainable_filter(self) -> nnx.filterlib.Filter:
        """The filter this run trains by (`state.params`): `trainable`, or under LoRA the adapters'."""
        return adapters.partition(self.lora, self.trainable)["trainable"]

    def trainable_variables(self) -> nnx.State:
        """A fresh module's trained variables (a copy of `model=`'s, if given), with `state.params`' tree, shapes and
        logical axes: the builder of a `Frozen` entry mirroring them, e.g. an EMA. A PEFT adapter's shapes need no
        concrete base."""
        args = self._arguments
        module = nnx.clone(self._given_model) if self._given_model is not None else self._created_module()
        if args.lora_adapter_path:
            apply_switches(adapters.adapt(module, self.lora, args.seed), args, self.mesh.devices.flat[0].platform)
        return nnx.state(module if args.lora_adapter_path else self.adapt_module(module), self.trainable_filter)

    def adapt_module(self, module: nnx.Module) -> nnx.Module:
        """Change the module before it is placed (eagerly, or under `nnx.eval_shape`); default: set its
        `remat` (from `remat_policy`), `scan_layers` and `attention_implementation`, and add the LoRA adapters the
        `lora_*` arguments ask for (in place: a module passed as `model=` gets them too); with `loss_chunk_size`,
        check the module can have its loss chunked."""
        args = self._arguments
        module = adapters.adapt(module, self.lora, args.seed, args.lora_adapter_path)  # per layer, then stacked
        apply_switches(module, args, self.mesh.devices.flat[0].platform)
        if args.loss_chunk_size and (problem := chunking_problem(module)):
            raise ArgumentError("loss_chunk_size", problem)
        return module

    def configure_model(self) -> ConfiguredModel:
        """Create the train state directly on the mesh, or restore a resumed run's state straight into it."""
        args = self._arguments
        placement.check_given_module(self._given_model, self.dtype, self.param_dtype,  # create_module's: above
                                     trained=self.trainable_filter)
        if self._given_model is not None:  # before it is placed (the trainer's own: `_abstract_module`)
            self._settle_evaluators(self._given_model)
        tx = checked_optimizer(self.configure_optimizer(self.scheduler))  # `scheduler`: settled by `setup`
        placed = dict(seed=args.seed, mesh=self.mesh, rules=self.partition_rules,
                      **adapters.partition(self.lora, self.trainable))
        frozen = FrozenPlan(self.configure_frozen(), self.mesh, self.partition_rules,
                            resuming=self._resume_from is not None, stacked=self.initialising)
        self._frozen_plan = frozen  # its fixed entries' digests go into run_info (`run_record`)
        if self._resume_from is None:
            state, shardings = self._place_module(tx, placed)
        else:
            state, shardings = self._restore(tx, placed, frozen)
        state, shardings = frozen.attach_to(state, shardings)
        # Keep the fixed entries' digests, not the plan: it holds the values it was given (a copied teacher's original).
        self._frozen_fingerprints, self._frozen_plan = frozen_fingerprints(self), None
        self._source_weights = None  # `initial_policy()`'s read of init_weights_from: the policy is placed or restored
        module = self._given_model if self._given_model is not None else state.model()
        return ConfiguredModel(bind(module, state), state, shardings, self.mesh)

    def configure_schedule(self, total_steps: int) -> optax.Schedule:
        """The learning rate of each update; `setup` calls it once, before `configure_model`, and the train step
        applies and logs it (`scheduler`). Its warmup and length are recorded in each checkpoint (`run_record`),
        marked as the default's where the run applies this very schedule (an override may wrap it)."""
        self._schedule_record = schedule_record(self._arguments, total_steps)
        self._default_schedule = build_schedule(self._arguments, total_steps)
        return self._default_schedule

    def configure_optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        return build_optimizer(self._arguments, schedule)

    # ------------------------------------------------------------------ compiled functions
    def compile_step(self, fn: Callable[..., Any], *, donate_state: bool = False, returns_state: bool = False,
                     replicated_args: int = 0, batch_outputs: step_outputs.BatchOutputs = False) -> Callable[..., Any]:
        """`jax.jit` of a pure `fn(state, batch, *replicated_args)` with this trainer's shardings, donation choice,
        activation layout and XLA options. Outputs are replicated (or `(state, outputs)` with `returns_state`), except
        `batch_outputs`: True splits every output like the batch, names split those entries of a dict of outputs
        (rows a rollout makes, which the train step takes only laid out as its batch is)."""
        step_outputs.check_batch_outputs(batch_outputs)
        if self._model is None:  # the shardings come from the model
            self.setup()
        state_sh, replicated = self._model.state_shardings, sharding.replicated(self.mesh)
        fn, outputs = step_outputs.laid_out(fn, batch_outputs, returns_state, self.mesh)
        traced = sharding.with_activation_layout(fn, self.mesh, self.partition_rules)
        in_shardings = (state_sh, sharding.batch_sharding(self.mesh)) + (replicated,) * replicated_args
        out_shardings = (state_sh, outputs) if returns_state else outputs
        laid = {} if out_shardings is None else {"out_shardings": out_shardings}  # None: XLA follows `fn`'s constraints
        return jax.jit(traced, in_shardings=in_shardings, **laid, donate_argnums=0 if donate_state else (),
                       compiler_options=self.compiler_options)

    def train_function(self) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
        """The pure `(state, batch) -> (state, metrics)` step `configure_functions` compiles: one update with this
        trainer's loss, schedule, accumulation and non-finite policy. Wrap it to do more after every update (an
        EMA, a reference moved toward the policy) inside the same compiled program: no second dispatch."""
        args = self._arguments
        return functools.partial(steps.train_step, loss_fn=self.compute_loss, schedule=self._schedule,
                                 num_micro=args.gradient_accumulation_steps,
                                 skip_non_finite=args.non_finite_policy != "ignore")

    def configure_functions(self) -> ConfiguredFunctions:
        """`train_function` (state donated) and the eval step, each compiled once by `compile_step`."""
        evaluate = functools.partial(steps.eval_step, loss_fn=self.compute_loss, metrics_fn=self.compute_metrics)
        return ConfiguredFunctions(train_step=self.compile_step(self.train_function(), donate_state=True,
                                                                returns_state=True),
                                   eval_step=steps.numbered(self.compile_step(evaluate, replicated_args=1)))

    # ------------------------------------------------------------------ running
    def train_iteration(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        """One iteration of the loop on one global batch. Default: one compiled train step; override for,
        e.g., several updates per batch (merge their metrics with `easytrain.metrics.merge_all`; the
        schedule counts updates, so size it with `configure_schedule(updates_per_batch * total_steps)`)."""
        return self._functions.train_step(state, batch)

    def longest_batch_length(self) -> int | None:
        """The longest batch `collate` can make where it pads batches to buckets; None: one shape throughout."""
        return None

    def plan_memory(self, state: TrainState, batch: Mapping[str, jax.Array]) -> memory_plan.MemoryPlan | None:
        """Before the first iteration: compile the train step for this batch (its first call reuses that), stretched
        to `longest_batch_length` where devices report a limit, and raise `DeviceMemoryError` if it cannot fit
        (`easytrain.memory_plan`). Override to return None when `train_iteration` gives the train step other shapes
        than the loop's batch (it compiles at its first call)."""
        if (length := self.longest_batch_length()) is not None:
            batch = memory_plan.worst_case(batch, length, self.mesh.devices.flat)
        return memory_plan.compile_ahead(self._functions.train_step, state, batch, self.mesh.devices.flat)

    def train(self) -> dict[str, float]:
        """Train until `max_steps` / `num_train_epochs` (or a stop request); returns the last logs. Once per
        trainer: a later run resumes from its checkpoint in a new trainer. A SIGTERM or SIGINT before the first step
        raises `TrainingPreempted` (exit status 75), nothing lost: `easytrain.trainers.preemption`. A run that ends
        before its first step is done (that signal, a step refused for memory, a loss that fails to compile) leaves
        the older run in output_dir as it was: `easytrain.trainers.held_run`."""
        with process_failure.running(), process_failure.before_ending(self._give_back_claim), \
                preemption.stopping_before_training(self._resume_from):
            self.setup()
            start = self._resume_from[1] if self._resume_from else 0
            if self.loop is not None:  # the loop's own record: `state.step` counts updates, maybe several per step
                self.loop.check_not_run()
            check_run_length(self._data.total_steps, start)
            try:
                records = tracker_records(Path(self._arguments.output_dir)) if self.is_main_process else {}
                trackers, self.loop = trackers_then_claim(self._arguments, start, self.is_main_process,
                                                          functools.partial(self._claim, records))
                logs = self.loop.run(self._state, start, self.resumed_data_state,
                                     resumed=self._resume_from is not None, trackers=trackers)
                if self._held_run:  # it ended without a step, as asked (nothing left to train): what it wrote stays
                    self._held_run.settle()
                return logs
            except BaseException:
                self._give_back_claim()
                raise
            finally:  # the step donated the arrays the module pointed at: show it the final ones
                bind(self._model.model, self._state)
                run_lock.release(self._arguments.output_dir)  # taken by the claim

    def loop_parts(self) -> LoopParts:
        """The collaborators the loop runs with."""
        return LoopParts(
            arguments=self._arguments, data=self._data, iteration=self.train_iteration, to_device=self.to_global,
            count_tokens=self.count_tokens, count_token_slots=self.count_token_slots, model_flops=self.model_flops,
            count_samples=self.count_samples, plan_memory=self.plan_memory,
            publish=functools.partial(setattr, self, "_state"), checkpoints=self.checkpoint_manager(),
            run_info=self.run_info, evaluate=self.evaluate, export=self.save_pretrained,
            restore_best=functools.partial(restore_step, self.checkpoint_manager(), self._model.state_shardings),
            callbacks=self.callbacks, owner=self, is_main_process=self.is_main_process,
            resumed_from=preemption.resume_point(self._resume_from)[1],
            settle_claim=self._held_run.settle if self._held_run else None)

    def evaluate(self, dataset: Any = None) -> dict[str, float]:
        """Every eval metric over the whole eval set (`eval_` prefixed), plus the evaluators'.

        Results do not depend on the eval batch size (unless the loss draws from its key, one per batch:
        `steps.eval_key`): metrics are merged on device and divided once. With
        `dataset` (raw examples, like the configured eval set's), that set instead, prepared by
        `prepare_eval_dataset`; evaluators (generation metrics) run on the configured set only.
        """
        self.setup()
        metrics: dict[str, float] = {}
        batches = self._data.eval if dataset is None else self._eval_batches(builders.prepared_eval_rows(self, dataset))
        if batches is not None:
            metrics = evaluate_batches(steps.bound_eval(self._functions.eval_step, self._state),
                                       map(self.to_global, batches))
        for evaluator in self.evaluators if dataset is None else ():
            metrics.update(evaluator(self))
        return metrics

    def to_global(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """One global array per field from this host's rows (no copy of other hosts' data); the
        `host_only_fields` (bookkeeping such as `example_id`) stay on the host."""
        return batch_fields.to_device_batch(host_batch, self.mesh, self.host_only_fields)
