"""`BaseTrainer`'s default hooks: causal language modelling of tokenised text with a Llama-family
model, exported in Hugging Face layout.

Each is one public hook; a trainer for another kind of data or module (an image classifier, a
preference model) overrides the ones it needs and inherits the rest of `BaseTrainer` unchanged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import flax
import jax
import numpy as np
from flax import nnx

from easytrain import flops, placement, throughput
from easytrain.data import RowSource, lm_collate_rows
from easytrain.data.sources import evaluation_examples
from easytrain.data.token_range import vocab_size_of
from easytrain.evaluators import arithmetic_exact_match
from easytrain import eval_metrics
from easytrain.errors import ArgumentError
from easytrain.eval_metrics import Predictions
from easytrain.losses import Batch, LossOutput, causal_lm_loss
from easytrain.metrics import Metric
from easytrain.steps import DefaultMetrics
from easytrain.models import SUPPORTED_MODEL_TYPES, LlamaForCausalLM, from_pretrained, save_pretrained
from easytrain.models.hf_export import CheckpointError, export_plan, generation_config_to_write
from easytrain.models.hf_load import generation_config_of, read_generation_config
from easytrain.trainers import adapters, builders, lm_blocks
from easytrain.trainers.resume import config_dict


class LanguageModelHooks:
    """Data, module, loss and export of causal language modelling (mixed into `BaseTrainer`)."""

    def prepare_datasets(self) -> tuple[RowSource, RowSource | None]:
        """Rows to train and evaluate on, before batching. Default: text tokenised into blocks for
        causal language modelling (also sets `tokenizer` and `model_config`)."""
        args = self._arguments
        embedded = builders.uses_embedded_data(args, self._raw_train, self._raw_eval)
        self.tokenizer = builders.ensure_pad_token(self.tokenizer or builders.build_tokenizer(args, embedded=embedded))
        self.model_config = getattr(self._given_model, "config", None) if self._given_model is not None \
            else builders.build_model_config(args, self.tokenizer)
        builders.check_max_length(args, self.model_config)
        splits = builders.raw_datasets(args, self._raw_train, self._raw_eval)
        if embedded and not self.evaluators and "validation" in splits and self.wants_metric("exact_match"):
            limit = min(256, args.max_eval_samples or 256)  # eval_loss's cap: the rows max_eval_samples keeps
            self.evaluators.append(arithmetic_exact_match(splits["validation"], self.tokenizer, limit))
        return lm_blocks.lm_blocks(args, self.tokenizer, splits, vocab_size=vocab_size_of(self.model_config))

    def collate(self, rows: Mapping[str, np.ndarray], example_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Rows -> one host batch, for training and evaluation alike. Rows whose example id is negative
        pad the last eval batch and must weigh nothing in the loss. Default: shifted token blocks."""
        return lm_collate_rows(rows, example_ids)

    def count_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Tokens in this process's host batch, for `tokens_per_second` (0: not a token model)."""
        return int(np.size(batch["input_ids"])) if "input_ids" in batch else 0

    def count_samples(self, batch: Mapping[str, np.ndarray]) -> int | None:
        """Samples this process's host batch trains on, for `samples_per_second` (times the process count, as
        `count_tokens`: every process holds an equal share). Default: its rows (a packed row counts once; None, no
        array field: the global batch size). A step that trains on more rows than its batch (G sampled completions
        per prompt) counts those."""
        return throughput.batch_rows(batch)

    def count_token_slots(self, batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """(real tokens, token slots) in this process's host batch, for `padding_efficiency`; real means
        attended or supervised. (0, 0): not a token model, nothing logged."""
        return throughput.token_slots(batch)

    def model_flops(self, batch: Mapping[str, np.ndarray]) -> float:
        """Model FLOPs of one training step on this process's host batch, for `mfu` (0: unknown, not
        logged). Default: the Llama-family count (`easytrain.flops`) over every token slot, padding
        included (padding is computed too; `padding_efficiency` says how much of it is useful), with the
        weights `trainable_filter` leaves frozen (the base under LoRA) costing no weight gradient."""
        if "input_ids" not in batch or getattr(self.model_config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return 0.0
        ids = np.asarray(batch["input_ids"])
        module = self._model.model if getattr(self, "_model", None) is not None else None
        counted = self.__dict__.setdefault("_flops_per_token", {})  # length -> (config, module, FLOPs per token)
        config, counted_module, per_token = counted.get(ids.shape[-1], (None, None, 0))
        if config is not self.model_config or counted_module is not module:  # once each: 20 us a step otherwise
            per_token = flops.training_flops_per_token(self.model_config, ids.shape[-1], self._matmul_weights(module))
            counted[ids.shape[-1]] = (self.model_config, module, per_token)
        return float(per_token * ids.size)

    def _matmul_weights(self, module: nnx.Module | None) -> flops.MatmulWeights | None:
        """`module`'s (trained, frozen) matmul weights by `trainable_filter`, counted once per module (None: no
        module yet, every weight of `model_config` counts as trained)."""
        if module is None:
            return None
        counted_module, weights = self.__dict__.get("_counted_matmul_weights", (None, None))
        if counted_module is not module:
            tied = bool(getattr(self.model_config, "tie_word_embeddings", False))
            weights = flops.matmul_weights(module, self.trainable_filter, tied)
            self.__dict__["_counted_matmul_weights"] = (module, weights)
        return weights

    #: True inside `initialising()`: a module built then is laid out afterwards (`adapt_module`, `easytrain.frozen`).
    initialising_module: bool = False

    def create_module(self) -> nnx.Module:
        """A freshly initialised module of the configured architecture. Runs under `jax.jit` (sharded init)
        or `nnx.eval_shape`, so it creates its own `nnx.Rngs`. Its layers are built stacked under
        `scan_layers`, and whenever `initialising_module` is set (one vmapped layer: an initialisation compiled
        once whatever the depth, the same weights as built one by one); `adapt_module` then sets the run's
        layout outside that program, one weight at a time."""
        if self.model_config is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no model_config, which the default create_module builds a Llama model "
                "from (the default prepare_datasets sets it; yours is overridden): override create_module to return "
                "your module (creating its own nnx.Rngs), or pass model= to the trainer.")
        return LlamaForCausalLM(self.model_config, dtype=self.dtype, param_dtype=self.param_dtype,
                                rngs=nnx.Rngs(self._arguments.seed),
                                scan_layers=self._arguments.scan_layers or self.initialising_module)

    @contextlib.contextmanager
    def initialising(self) -> Iterator[None]:
        """`initialising_module` set for the block: where a fresh module is built and then laid out (the trainer's
        own, and `Frozen` builders whose stacked build unstacks to their usual tree: `easytrain.frozen`)."""
        before, self.initialising_module = self.initialising_module, True
        try:
            yield
        finally:
            self.initialising_module = before

    def initial_module(self) -> nnx.Module:
        """A fresh run's module, concrete: `create_module()` inside one jitted program, straight into its sharded
        layout, with `initialising_module` set (the trainer's policy; DPO's reference when no path is given)."""
        with self.initialising():
            return placement.initialise_module(self._created_module, mesh=self.mesh, rules=self.partition_rules)

    def _created_module(self) -> nnx.Module:
        """`create_module()`, where the error flax raises for `nnx.Rngs` made outside it (in `__init__`, and so
        outside the program that builds the module) says where to make them."""
        try:
            module = self.create_module()
        except flax.errors.TraceContextError as error:
            raise TypeError(f"create_module runs inside a compiled program (jax.jit or nnx.eval_shape), and the "
                            f"module it built drew from state made outside it ({error}); create the module's "
                            "nnx.Rngs inside create_module, e.g. MyModule(rngs=nnx.Rngs(self.arguments.seed)), "
                            "never in __init__ or at module level.") from error
        if not isinstance(module, nnx.Module):
            what = f"the class {module.__name__}" if isinstance(module, type) else f"a {type(module).__name__}"
            raise TypeError(f"create_module returned {what}; return the module it builds, an instance of an "
                            "nnx.Module, e.g. MyModule(rngs=nnx.Rngs(self.arguments.seed)).")
        return module

    def _checked_module(self) -> nnx.Module:
        """`_created_module()`, with a warning when its parameters are not in `param_dtype` (traced once a setup),
        and its compute dtype checked as a `model=` module's is (`placement.check_compute_dtype`)."""
        module = self._created_module()
        placement.warn_unless_param_dtype(module, self.param_dtype, trained=self.trainable_filter)
        return placement.check_compute_dtype(module, self.dtype)

    def _own_module(self) -> nnx.Module:
        """The module the trainer builds: streamed tensor by tensor from `model_name_or_path` straight into the
        training layout, or initialised by one program once what `adapt_module` refuses (switches, LoRA targets,
        an adapter without its base) is refused on shapes, with no weight drawn."""
        if path := self._arguments.model_name_or_path:
            stacked = self._arguments.scan_layers and self.lora is None  # LoRA adapts separate layers first
            return from_pretrained(path, dtype=self.dtype, scan_layers=stacked, param_dtype=self.param_dtype,
                                   mesh=self.mesh, rules=self.partition_rules)
        self._abstract_module()
        return self.initial_module()

    def _abstract_module(self) -> nnx.Module:
        """The module's shapes as a fresh run lays it out (built with `initialising_module` set, then adapted), nothing
        drawn: what `adapt_module` refuses, it refuses here, and the tree a checkpoint restores into. Stacked, the
        build is one layer's trace whatever the depth (0.07 s instead of 0.6-0.85 s for `llama-3b`'s 28 layers)."""
        with self.initialising():
            module = placement.abstract_module(lambda: self.adapt_module(self._checked_module()))
        self._settle_evaluators(module)  # its type is known: before any weight is drawn
        return module

    def compute_loss(self, model: nnx.Module, batch: Batch, rng: jax.Array, train: bool,
                     frozen: Mapping[str, Any]) -> LossOutput:
        """The objective, traced inside the compiled step. Override to change it.

        Return `LossOutput(loss_sum, count, metrics)`: a *sum* and the count it is normalised by, never
        a mean, so accumulation and data parallelism divide once by the global count. `frozen` holds
        the `configure_frozen` entries (modules in eval mode). `train` is False in evaluation.
        """
        return causal_lm_loss(model, batch, rng, train, frozen, chunk_size=self._arguments.loss_chunk_size)

    def compute_metrics(self, predictions: Predictions | None, batch: Batch) -> dict[str, Metric]:
        """Evaluation metrics from the loss's `predictions`, traced inside the eval step (never gathered to the
        host); each says how it reduces (`easytrain.metrics`). Default: the on-device metrics `eval_metrics`
        names (`easytrain.eval_metrics`); with `eval_metrics` unset, one the loss already reports (a classifier's own
        `accuracy`) is left to the loss. Override to add your own; reported as `eval_<name>`."""
        requested = self._arguments.eval_metrics
        names = tuple(eval_metrics.DEFAULT if requested is None else requested)
        try:
            metrics = eval_metrics.on_device_metrics(names, predictions, requested=requested is not None)
        except ValueError as error:
            raise ArgumentError("eval_metrics", str(error)) from None
        return metrics if requested is not None else DefaultMetrics(metrics)  # unasked: the loss's own name wins

    def wants_metric(self, name: str) -> bool:
        """Whether `eval_metrics` asks for `name` (unset: every metric the trainer can compute)."""
        return self._arguments.eval_metrics is None or name in self._arguments.eval_metrics

    def prepare_eval_dataset(self, dataset: Any) -> RowSource:
        """Rows of another evaluation set for `evaluate(dataset)`: raw examples (a `datasets.Dataset`) prepared
        as the configured eval set is. Default: text tokenised into blocks, for the default rows only."""
        if type(self).prepare_datasets is not LanguageModelHooks.prepare_datasets:
            raise NotImplementedError(
                f"{type(self).__name__} overrides prepare_datasets, so evaluate(dataset) cannot prepare raw "
                "examples as language-model text blocks: override prepare_eval_dataset(dataset) to turn them into "
                "the rows your collate takes (return the dataset itself if its examples already are such rows).")
        return lm_blocks.lm_eval_blocks(self._arguments, self.tokenizer, evaluation_examples(dataset),
                                       vocab_size=vocab_size_of(self.model_config))

    def export_problem(self) -> str | None:
        """Why `save_pretrained` cannot export this run, or None; asked before training starts."""
        if type(self).save_pretrained is not LanguageModelHooks.save_pretrained:
            return None
        if config_dict(self.model_config) is None:
            return "the model has no Hugging Face config, so it cannot be exported in Hugging Face layout"
        if self.lora is None and (mismatch := export_mismatch(self.model, self.model_config)):
            return (f"the default save_pretrained writes model_config's Hugging Face layout, and "
                    f"{type(self.model).__name__}'s parameters are not that layout ({mismatch})")
        return None if self.lora is not None and self.arguments.lora_export == "adapter" else self._ids_problem()

    def _ids_problem(self) -> str | None:
        """Why the export would refuse the generation config it writes (its token ids: the base's file, the one
        the model was loaded with, else the config's), or None: found before training, not at its end."""
        base = self.arguments.model_name_or_path
        try:
            generation_config_to_write(self.model_config,
                                       read_generation_config(base) if base else generation_config_of(self.model))
        except CheckpointError as error:
            return str(error).rstrip(".")
        return None

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors and the tokenizer in Hugging Face layout; under LoRA, as
        `lora_export` says: the merged model, and/or a PEFT adapter in `directory/adapter`. The generation config
        is `model_name_or_path`'s, unchanged (an instruct model's extra EOS ids and sampling defaults live only
        there), else derived from the config."""
        self.setup()
        if self._checkpoints is not None:
            self._checkpoints.wait_until_finished()
        directory = Path(directory)  # every process takes part (gathers); only process 0 writes
        base = self.arguments.model_name_or_path
        generation_config = read_generation_config(base) if base else None  # a resumed module never loaded it
        if self.lora is not None:
            return adapters.export(directory, self.model, self.lora, how=self.arguments.lora_export,
                                   model_config=self.model_config, tokenizer=self.tokenizer,
                                   base_model_name_or_path=base, generation_config=generation_config)
        save_pretrained(directory, self.model, self.model_config, tokenizer=self.tokenizer,
                        generation_config=generation_config)
        return directory


def export_mismatch(module: nnx.Module, model_config: Any) -> str | None:
    """Why the Hugging Face export of `model_config` cannot write `module`'s parameters (from their paths and shapes,
    by the export's own naming; nothing is read from a device), or None. The library's own model of an equal config
    matches by construction, so its layout is not built again."""
    if isinstance(module, LlamaForCausalLM) and (module.config is model_config
                                                 or module.config.to_dict() == model_config.to_dict()):
        return None
    shapes = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
                          nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    try:
        export_plan(shapes, model_config, None)
    except CheckpointError as error:  # its names, without the advice on a checkpoint's config that follows them
        return str(error).split(". Check that the config")[0]
    return None
