"""`BaseTrainer`: wires data, model, compiled steps, logging and checkpoints together.

The math lives in pure functions (`easytrain.steps`, `easytrain.losses`); this class only builds
them once and drives the loop. Override `compute_loss` to change the objective, or any
`configure_*` hook to change how a piece is built.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from easytrain import distributed, placement, sharding, steps
from easytrain.arguments import TrainingArguments
from easytrain.callbacks import Callback, CallbackList, EarlyStopping
from easytrain.checkpoint import CHECKPOINTS_DIRNAME, CheckpointManager
from easytrain.config_io import save_arguments
from easytrain.data import TrainBatches, eval_batches
from easytrain.errors import ArgumentError
from easytrain.evaluators import Evaluator, arithmetic_exact_match
from easytrain.losses import Batch, LossOutput, causal_lm_loss
from easytrain.models import LlamaForCausalLM, from_pretrained, save_pretrained
from easytrain.optim import build_optimizer, build_schedule
from easytrain.protocol import ConfiguredDataloaders, ConfiguredFunctions, ConfiguredModel
from easytrain.state import bind
from easytrain.trainers import builders
from easytrain.trainers.loop import TrainLoop
from easytrain.trainers.resume import config_dict, restore_checkpoint
from easytrain.trainers.run_dir import prepare_output_dir

logger = logging.getLogger("easytrain")
FORMAT_VERSION = 1
HOST_ONLY_FIELDS = ("example_id",)


class BaseTrainer:
    """Causal-LM training on one device, a mesh of devices, or many hosts.

    Args:
        arguments: every knob of the run; defaults train the embedded arithmetic task.
        model: an NNX module to train instead of building one from `arguments`.
        tokenizer: a Hugging Face tokenizer; by default loaded from `arguments`.
        dataset_train / dataset_eval: `datasets.Dataset`s of raw text (or a `DatasetDict`).
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

    def __init__(self, arguments: TrainingArguments | None = None, *, model: nnx.Module | None = None,
                 tokenizer: Any = None, dataset_train: Any = None, dataset_eval: Any = None,
                 callbacks: Sequence[Callback] = (), evaluators: Sequence[Evaluator] = ()):
        self._arguments = arguments if arguments is not None else TrainingArguments()
        distributed.initialize(self._arguments)  # before any other JAX call
        self._given_model = model
        self.tokenizer = tokenizer
        self._raw_train, self._raw_eval = dataset_train, dataset_eval
        self.callbacks = CallbackList(list(callbacks) + self._default_callbacks())
        self.evaluators: list[Evaluator] = list(evaluators)
        self.should_stop = False
        self.is_main_process = jax.process_index() == 0
        self._resume_from = prepare_output_dir(self._arguments, is_main_process=self.is_main_process)
        distributed.barrier("easytrain:output_dir")  # process 0 may have cleared or moved checkpoints
        self.mesh = self.configure_mesh()
        self._data: ConfiguredDataloaders | None = None
        self._model: ConfiguredModel | None = None
        self._functions: ConfiguredFunctions | None = None
        self._schedule: optax.Schedule | None = None
        self._checkpoints: CheckpointManager | None = None
        self.model_config: Any = None
        self.resumed_data_state: dict[str, Any] | None = None
        self.loop: TrainLoop | None = None

    # ------------------------------------------------------------------ protocol properties
    @property
    def arguments(self) -> TrainingArguments:
        return self._arguments

    @property
    def dataset_train(self) -> Any:
        self.setup()
        return self._dataset_train

    @property
    def dataset_eval(self) -> Any:
        self.setup()
        return self._dataset_eval

    @property
    def model(self) -> nnx.Module:
        """The module being trained, showing the current state.

        Always the same object (the one passed as `model=`, if any), re-pointed at the current arrays
        whenever it is read and when `train()` ends, so a reference kept across training stays valid.
        """
        self.setup()
        return bind(self._model.model, self._state)

    @property
    def state(self) -> Any:
        self.setup()
        return self._state

    @property
    def state_shardings(self) -> Any:
        """`NamedSharding`s of every state leaf on the current mesh (also the checkpoint restore layout)."""
        self.setup()
        return self._model.state_shardings

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self._arguments.dtype)

    @property
    def param_dtype(self) -> np.dtype:
        return jnp.dtype(self._arguments.param_dtype)

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return self.state.tx

    @property
    def scheduler(self) -> optax.Schedule:
        self.setup()
        return self._schedule

    # ------------------------------------------------------------------ set-up hooks
    def setup(self) -> None:
        """Build data, model and compiled steps once, in that order (all checks before compute)."""
        if self._functions is not None:
            return
        self._data = self.configure_dataloaders()
        self._model = self.configure_model()
        self._state = self._model.state
        self._functions = self.configure_functions()

    def configure_mesh(self) -> jax.sharding.Mesh:
        args = self._arguments
        return sharding.make_mesh(args.data_parallel_size, args.fsdp_size, args.tensor_parallel_size)

    def configure_dataloaders(self) -> ConfiguredDataloaders:
        """Tokenise and block the datasets, then wrap them in resumable per-host loaders."""
        args = self._arguments
        embedded = builders.uses_embedded_data(args, self._raw_train)
        if self.tokenizer is None:
            self.tokenizer = builders.build_tokenizer(args, embedded=embedded)
        self.tokenizer = builders.ensure_pad_token(self.tokenizer)
        self.model_config = self._given_model.config if self._given_model is not None else \
            builders.build_model_config(args, self.tokenizer)
        builders.check_max_length(args, self.model_config)
        self._check_batch_sizes()
        splits = builders.raw_datasets(args, self._raw_train, self._raw_eval)
        if embedded and not self.evaluators and "validation" in splits:
            self.evaluators.append(arithmetic_exact_match(splits["validation"], self.tokenizer))
        self._dataset_train, self._dataset_eval = builders.lm_blocks(args, self.tokenizer, splits)
        loader = TrainBatches(self._dataset_train, args.train_batch_size, seed=args.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
        per_epoch = loader.steps_per_epoch
        total = args.max_steps if args.max_steps > 0 else per_epoch * args.num_train_epochs
        return ConfiguredDataloaders(loader, self._dataset_eval, per_epoch, total)

    def configure_model(self) -> ConfiguredModel:
        """Create the train state directly on the mesh, or restore a resumed run's state straight into it."""
        args = self._arguments
        self._schedule = self.configure_schedule(self._data.total_steps)
        tx = self.configure_optimizer(self._schedule)
        placed = dict(seed=args.seed, mesh=self.mesh, rules=self.partition_rules, trainable=self.trainable)
        if self._resume_from is not None:  # never initialise (or load) weights only to overwrite them
            module = self._given_model or placement.abstract_module(self._model_fn())
            target, shardings = placement.abstract_train_state(module, tx, **placed)
            restored = restore_checkpoint(self._resume_from, self, target)
            state, self.resumed_data_state = restored.state, restored.data_state
            self.callbacks.load_state_dict(restored.callbacks_state)
        elif self._given_model is not None:  # copied: the step donates its buffers, the caller keeps theirs
            state, shardings = placement.place_module(self._given_model, tx, **placed)
        elif args.model_name_or_path:  # streamed tensor by tensor straight into the training layout
            module = from_pretrained(args.model_name_or_path, dtype=self.dtype, param_dtype=self.param_dtype,
                                     mesh=self.mesh, rules=self.partition_rules)
            state, shardings = placement.place_module(module, tx, copy=False, **placed)
        else:
            state, shardings = placement.create_state(self._model_fn(), tx, **placed)
        module = self._given_model if self._given_model is not None else state.model()
        return ConfiguredModel(bind(module, state), state, shardings, self.mesh)

    def _model_fn(self) -> Callable[[], nnx.Module]:
        """Builds the configured architecture; Rngs are created inside, so a traced init never captures them."""
        def model_fn() -> nnx.Module:
            return LlamaForCausalLM(self.model_config, dtype=self.dtype, param_dtype=self.param_dtype,
                                    rngs=nnx.Rngs(self._arguments.seed))
        return model_fn

    def configure_schedule(self, total_steps: int) -> optax.Schedule:
        return build_schedule(self._arguments, total_steps)

    def configure_optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        return build_optimizer(self._arguments, schedule)

    def configure_functions(self) -> ConfiguredFunctions:
        """Bind the loss and settings, then jit once with explicit shardings and state donation."""
        args = self._arguments
        state_sh = self._model.state_shardings
        batch_sh, replicated = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        train = functools.partial(steps.train_step, loss_fn=self.compute_loss, schedule=self._schedule,
                                  num_micro=args.gradient_accumulation_steps,
                                  skip_non_finite=args.non_finite_policy != "ignore")
        evaluate = functools.partial(steps.eval_step, loss_fn=self.compute_loss)
        # Activation sharding constraints resolve logical names against this mesh and rules while tracing.
        train, evaluate = (sharding.with_activation_layout(step, self.mesh, self.partition_rules)
                           for step in (train, evaluate))
        return ConfiguredFunctions(
            train_step=jax.jit(train, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                               donate_argnums=0),
            eval_step=jax.jit(evaluate, in_shardings=(state_sh, batch_sh), out_shardings=replicated))

    # ------------------------------------------------------------------ the objective
    def compute_loss(self, model: nnx.Module, batch: Batch, rng: jax.Array, train: bool) -> LossOutput:
        """The objective, traced inside the compiled step. Override to change it.

        Return `LossOutput(loss_sum, num_tokens, metric_sums)`: *sums* over supervised tokens, never
        means, so gradient accumulation and data parallelism normalise once by the global token count.
        """
        return causal_lm_loss(model, batch, rng, train)

    # ------------------------------------------------------------------ running
    def train(self) -> dict[str, float]:
        """Train until `max_steps` / `num_train_epochs` (or a stop request); returns the last logs."""
        self.setup()
        self.loop = TrainLoop(self)
        try:
            return self.loop.run()
        finally:  # the step donated the arrays the module pointed at: show it the final ones
            bind(self._model.model, self._state)

    def evaluate(self) -> dict[str, float]:
        """Token-weighted eval loss, perplexity and accuracy over the whole eval set, plus evaluators.

        Results do not depend on the eval batch size: sums are accumulated on device and divided once.
        """
        self.setup()
        metrics: dict[str, float] = {}
        if self._dataset_eval is not None:
            metrics = steps.summarize([self._eval_sums()], prefix="eval_")
            metrics["eval_perplexity"] = float(np.exp(min(metrics["eval_loss"], 700.0)))
        for evaluator in self.evaluators:
            metrics.update(evaluator(self))
        return metrics

    def _eval_sums(self) -> dict[str, float]:
        args, sums = self._arguments, None
        for batch in eval_batches(self._dataset_eval, args.eval_batch_size, process_index=jax.process_index(),
                                  process_count=jax.process_count()):
            batch_sums = self._functions.eval_step(self._state, self.to_global(batch))
            sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
        return jax.device_get(sums)

    def to_global(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """One global array per field from this host's rows (no copy of other hosts' data).

        Host-only bookkeeping fields (`example_id`) stay on the host.
        """
        batch_sh = sharding.batch_sharding(self.mesh)
        return {key: jax.make_array_from_process_local_data(batch_sh, value) for key, value in host_batch.items()
                if key not in HOST_ONLY_FIELDS}

    # ------------------------------------------------------------------ checkpoints and export
    def checkpoint_manager(self) -> CheckpointManager:
        if self._checkpoints is None:
            args = self._arguments
            self._checkpoints = CheckpointManager(
                Path(args.output_dir) / CHECKPOINTS_DIRNAME, max_to_keep=args.save_total_limit,
                async_save=args.async_checkpointing, best_metric=args.metric_for_best_model,
                greater_is_better=args.greater_is_better)
        return self._checkpoints

    def run_info(self) -> dict[str, Any]:
        """Everything besides arrays that a checkpoint must carry to be resumed or audited."""
        return {"format_version": FORMAT_VERSION, "arguments": self._arguments.to_dict(),
                "model_config": config_dict(self.model_config)}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors and the tokenizer in Hugging Face layout."""
        self.setup()
        if self._checkpoints is not None:
            self._checkpoints.wait_until_finished()
        directory = Path(directory)  # every process takes part (gathers); only process 0 writes
        save_pretrained(directory, self.model, self.model_config, tokenizer=self.tokenizer)
        return directory

    def save_arguments(self) -> Path | None:
        return save_arguments(self._arguments, self._arguments.output_dir) if self.is_main_process else None

    # ------------------------------------------------------------------ internals
    def _default_callbacks(self) -> list[Callback]:
        args = self._arguments
        if args.early_stopping_patience is None:
            return []
        return [EarlyStopping(metric=args.metric_for_best_model or "eval_loss",
                              patience=args.early_stopping_patience, greater_is_better=args.greater_is_better)]

    def _check_batch_sizes(self) -> None:
        args = self._arguments
        dp = sharding.data_parallel_size(self.mesh)
        micro = args.train_batch_size // args.gradient_accumulation_steps
        if micro % dp:
            raise ArgumentError("train_batch_size", f"each micro-batch has {micro} rows, which the {dp} data-parallel "
                                f"devices cannot split evenly; use a train_batch_size that is a multiple of "
                                f"{dp * args.gradient_accumulation_steps}.")
        if args.eval_batch_size % dp:
            raise ArgumentError("eval_batch_size", f"must be a multiple of the {dp} data-parallel devices.")

