"""`DPOTrainer`: preference optimisation as a paired batch layout, a reference and a loss on `BaseTrainer`.

One forward pass of the policy runs over chosen and rejected together (`[B, 2, T]` rows reshaped to
`[2B, T]`); per-sequence log-probabilities are float32 sums over completion tokens, computed without a
float32 log-softmax over the vocabulary (`easytrain.sequence_logps.token_logps`), or, with `loss_chunk_size`,
from the final hidden states a few tokens at a time (`easytrain.chunked_loss`). The reference is a frozen
copy of the initial policy (default; with `init_weights_from`'s weights when the run starts from them), another
model, precomputed log-probs, or a copy that moves toward the policy (TR-DPO); under LoRA, the policy's own weights
with the adapters off, or with the adapter values it started from (`lora_adapter_path`, `init_weights_from`). The
losses are the pure functions of `easytrain.preference`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from easytrain.arguments import TrainingArguments
from easytrain.chunked_loss import map_token_chunks, target_logps
from easytrain.data import RowSource, bucket_lengths
from easytrain.data.chat_templates import read_chat_template
from easytrain.data.paired_batches import PairedCollate, pair_rows
from easytrain.data.preference_data import PreferenceDataOptions, tokenize_preference_dataset, uses_chat_template
from easytrain.data.sources import evaluation_examples
from easytrain.data.token_range import filler_id, rows_of, vocab_size_of
from easytrain.errors import ArgumentError
from easytrain.frozen import Frozen
from easytrain.lora import adapters_disabled
from easytrain.losses import LossOutput
from easytrain.metrics import Mean, mean_over
from easytrain.models import LlamaForCausalLM, from_pretrained
from easytrain.models.hf_io import CheckpointError
from easytrain.models.hf_load import resolve_checkpoint
from easytrain.preference import PairLogps, combined_loss, reported_logps, sequence_logps, token_logps
from easytrain.protocol import ConfiguredModel
from easytrain.state import TrainState
from easytrain.tasks import arithmetic
from easytrain.tasks.registry import register_task
from easytrain.trainers import builders, run_dir
from easytrain.trainers.base import BaseTrainer
from easytrain.trainers.dpo_arguments import DPOArguments
from easytrain.trainers.dpo_record import DPORecordHooks
from easytrain.trainers.dpo_updates import REWARD_MEAN, update_then_track_rewards
from easytrain.trainers.dpo_reference import (
    CACHE_DIRNAME, DPO_REFERENCE, INITIAL_ADAPTERS, check_reference_path, precomputed_reference_logps,
    update_then_sync, with_initial_adapters, with_values)
from easytrain.trainers.initial_policy_checks import (checked_adapter_values, checked_initial_weights,
                                                      checked_reference_weights)

logger = logging.getLogger("easytrain")


@register_task("dpo", arguments=(DPOArguments,), replace=True,
               description="Preference optimisation (DPO, IPO, SimPO, ORPO, ...) on prompt/chosen/rejected pairs.")
class DPOTrainer(DPORecordHooks, BaseTrainer):
    """Preference optimisation. Without a dataset it trains on generated arithmetic pairs (right vs. near-miss).

    Args:
        arguments: the run.
        dpo_arguments: the preference options.
        formatting_func: maps a raw example to `prompt`/`chosen`/`rejected` form.
        **kwargs: as for `BaseTrainer`.
    """

    def __init__(self, arguments: TrainingArguments | None = None, dpo_arguments: DPOArguments | None = None, *,
                 formatting_func: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None, **kwargs: Any):
        if dpo_arguments is not None and not isinstance(dpo_arguments, DPOArguments):
            raise TypeError(f"dpo_arguments must be a DPOArguments, got {type(dpo_arguments).__name__}; pass "
                            "DPOArguments(...) (or None for its defaults).")
        self.dpo = dpo_arguments or DPOArguments()
        self.task_arguments = (self.dpo,)
        self.formatting_func = formatting_func
        self.data_stats: dict[str, dict[str, float]] = {}
        self.reference_logps_cached: dict[str, bool] = {}  # split -> read from the cache (not recomputed)
        self._loaded_adapter: dict | None = None  # the adapter values the policy starts from (`INITIAL_ADAPTERS`)
        super().__init__(arguments, **kwargs)  # `check_inputs` first: what the arguments alone refuse
        if self.dpo.disable_dropout and self.lora is not None and self.lora.dropout > 0:
            logger.warning("lora_dropout=%s is off in the DPO loss (disable_dropout, the default); pass "
                           "--no_disable_dropout to train with it.", self.lora.dropout)

    def check_inputs(self) -> None:
        check_arguments_for_dpo(self.arguments, self.dpo)  # first in the agreed start: a refusal leaves no output_dir
        if self.dpo.ref_model_name_or_path:  # refused before any data work: no such path, an unresolvable hub id
            check_reference_path(self.dpo.ref_model_name_or_path)
        if self.dpo.precompute_ref_log_probs and self.dpo.needs_reference:  # written once the reference pass is done
            run_dir.check_links(self.cache_dir.parent, (CACHE_DIRNAME,), movable=())

    # ------------------------------------------------------------------ data
    def prepare_datasets(self) -> tuple[RowSource, RowSource | None]:
        args = self.arguments
        embedded = builders.uses_embedded_data(args, self._raw_train, self._raw_eval)
        if self.tokenizer is None:
            self.tokenizer = (arithmetic.build_arithmetic_chat_tokenizer() if embedded and not args.model_name_or_path
                              else builders.build_tokenizer(args, embedded=False))
        self.tokenizer = builders.ensure_pad_token(self.tokenizer)
        if self.dpo.chat_template_path:
            self.tokenizer.chat_template = read_chat_template(self.dpo.chat_template_path)
        self.model_config = getattr(self._given_model, "config", None) if self._given_model is not None \
            else builders.build_model_config(args, self.tokenizer)
        builders.check_max_length(args, self.model_config)
        splits = (arithmetic.make_arithmetic_preference_splits(seed=args.seed) if embedded
                  else builders.raw_datasets(args, self._raw_train, self._raw_eval))
        options = self._data_options()
        self._pad = PairedCollate(bucket_lengths(args.max_length) if jax.process_count() == 1 else (args.max_length,),
                                  pad_id=filler_id(self.tokenizer.pad_token_id, self.model_config))
        rows = {}
        for name, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
            if name in splits:
                split = splits[name] if limit is None else splits[name].select(range(min(limit, len(splits[name]))))
                if name == "train" and self.dpo.chat_template_path and self.formatting_func is None:
                    check_template_read(split, self.dpo.chat_template_path)
                with rows_of(name):
                    rows[name], self.data_stats[name] = tokenize_preference_dataset(
                        split, self.tokenizer, options, formatting_func=self.formatting_func,
                        num_proc=args.preprocessing_num_workers, vocab_size=vocab_size_of(self.model_config))
        if self.dpo.precompute_ref_log_probs and self.dpo.needs_reference:  # one reference for every split
            rows = self._with_reference_logps(rows)
        for name, stats in self.data_stats.items():
            logger.info("DPO %s pairs: %s", name, ", ".join(f"{k}={v}" for k, v in stats.items()))
        return rows["train"], rows.get("validation")

    def prepare_eval_dataset(self, dataset: Any) -> RowSource:
        """Another eval set's pairs, tokenised as the configured one's (with precomputed reference log-probs
        when the run uses them)."""
        with rows_of(None):
            rows, _ = tokenize_preference_dataset(evaluation_examples(dataset), self.tokenizer, self._data_options(),
                                                  formatting_func=self.formatting_func,
                                                  num_proc=self.arguments.preprocessing_num_workers,
                                                  vocab_size=vocab_size_of(self.model_config))
        if self.dpo.precompute_ref_log_probs and self.dpo.needs_reference:
            rows = self._with_reference_logps({"evaluate": rows})["evaluate"]
        return rows

    def _data_options(self) -> PreferenceDataOptions:
        return PreferenceDataOptions(max_length=self.arguments.max_length + 1,
                                     max_prompt_length=self.dpo.max_prompt_length)

    def _with_reference_logps(self, splits: Mapping[str, Any]) -> dict[str, Any]:
        """Each split's rows with their reference log-probs (`ref_logps`), from one reference built, placed and
        compiled for all of them (`precomputed_reference_logps`)."""
        settings = {"max_length": self.arguments.max_length, "chunk": self.dpo.logps_chunk_size,
                    "dtype": str(self.dtype)}  # a bfloat16 run's reference differs from a float32 one's
        found = precomputed_reference_logps(
            self.reference(), splits, settings=settings, collate=self.collate,
            batch_size=self.arguments.eval_batch_size, sequence_logps=lambda m, b: self.pair_logps(m, b)[0],
            mesh=self.mesh, rules=self.partition_rules, cache_dir=self.cache_dir,
            is_main_process=self.is_main_process, compiler_options=self.compiler_options)
        if self._model is not None:  # evaluate(dataset) after set-up: no policy is left to take the read weights
            self._source_weights = None
        self._read_module_shared = False  # the reference has left the devices: the policy takes its arrays as read
        for name, (_, cached) in found.items():
            self.reference_logps_cached[name] = cached
        return {name: pair_rows(rows, {"ref_logps": found[name][0]}) for name, rows in splits.items()}

    @property
    def cache_dir(self) -> Path:
        """Where precomputed reference log-probs are cached, beside the checkpoints."""
        return Path(self.arguments.output_dir) / CACHE_DIRNAME

    def collate(self, rows: Mapping[str, np.ndarray], example_ids: np.ndarray) -> dict[str, np.ndarray]:
        return self._pad(rows, example_ids)

    def count_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        return int(np.sum(batch["attention_mask"]))

    # ------------------------------------------------------------------ reference
    def reference(self) -> Frozen:
        """The reference model: `ref_model_name_or_path` (in the policy's layout), else the initial policy
        (`initial_policy()`: the model loaded again, a copy of the module passed, or one initialised like it, with
        the run's adapters and `init_weights_from`'s weights). Checkpointed only when it moves (TR-DPO): a resume
        restores it into the module the fresh run built (through `adapt_module`), of which only the shapes are read."""
        explicit, moving = self.dpo.ref_model_name_or_path, self.dpo.sync_ref_model
        restored = moving and self._resume_from is not None  # from the checkpoint: only its build's shapes are read
        if explicit:
            try:
                path = resolve_checkpoint(explicit)
            except CheckpointError as error:
                raise ArgumentError("ref_model_name_or_path", str(error)) from error
            if restored:
                return Frozen(self._shapes_of(transformers.AutoConfig.from_pretrained(path)), checkpoint=True)
            module = self._like_the_policy(from_pretrained(path, dtype=self.dtype, param_dtype=self.param_dtype,
                                                           mesh=self.mesh, rules=self.partition_rules,
                                                           scan_layers=self.arguments.scan_layers))
            if not moving:  # rebuilt from `path` on resume
                self.reference_weights = checked_reference_weights(
                    module, field="ref_model_name_or_path", read_from=path, resume_from=self._resume_from,
                    subject=self.initial_policy_subject)
            return self._fixed(module, moving=moving)
        if restored:  # the policy's own build (`model_name_or_path`'s config, a clone of model=), never its weights
            given = self._given_model
            return Frozen(lambda: self._as_initial_policy(self._created_module() if given is None else nnx.clone(given),
                                                          checkpointed=True), checkpoint=True)
        return self._fixed(self._initial_policy_module(checkpointed=moving), moving=moving)

    def _fixed(self, module: nnx.Module, *, moving: bool) -> Frozen:
        """The reference entry of `module`, with the digests its resume record took of it (not taken again)."""
        digests = None if moving or self.reference_weights is None else self.reference_weights["fingerprint"]
        return Frozen(module, checkpoint=moving, copy=False, digests=digests)

    def _shapes_of(self, config: Any) -> Callable[[], nnx.Module]:
        """A builder of `ref_model_name_or_path`'s module as `from_pretrained` lays it out, for a restore target:
        traced for its shapes (`Frozen`), so no weight is read or drawn."""
        return lambda: self._like_the_policy(LlamaForCausalLM(config, dtype=self.dtype, param_dtype=self.param_dtype,
                                                              rngs=nnx.Rngs(0), scan_layers=self.arguments.scan_layers))

    #: How error messages name the initial policy: this trainer's reference.
    initial_policy_subject = DPO_REFERENCE

    #: The reference is the initial policy: a resume reads `init_weights_from` again (docs/dpo.md).
    reads_init_source_on_resume = True

    def _initial_weights(self, state: TrainState, shardings: TrainState) -> TrainState:
        """Also keeps the adapter values `init_weights_from` gave the policy when they are its reference (a resume
        places the policy again, and reads the source again, before it restores the trained adapters)."""
        if not self.reference_is_initial_adapters:  # the reference read the source first: the policy takes its values
            state = self._read_initial_weights(state, shardings, copy=not self.dpo.precompute_ref_log_probs)
            self._source_weights = None
            return state
        state, self.initial_policy_record = checked_initial_weights(
            super()._initial_weights, state, shardings, source=self.arguments.init_weights_from,
            resume_from=self._resume_from, subject=self.initial_policy_subject)
        self._loaded_adapter = state.params
        return state

    @property
    def _reference_from_policy(self) -> bool:
        return reference_from_policy(self.arguments, self.dpo)

    @property
    def reference_is_base(self) -> bool:
        """Under LoRA, the default reference is the policy with its adapters off (fresh adapters add nothing)."""
        return self._reference_from_policy and not self.reference_is_initial_adapters

    @property
    def reference_is_initial_adapters(self) -> bool:
        """Under LoRA from a trained adapter (`lora_adapter_path`) or another run's weights (`init_weights_from`): the
        policy's weights with a copy of the trainable values it started from (`INITIAL_ADAPTERS`)."""
        return self._reference_from_policy and starts_from_trained_weights(self.arguments)

    def configure_frozen(self) -> Mapping[str, Frozen]:
        frozen = {}
        if self.dpo.needs_reference and not self.dpo.precompute_ref_log_probs and not self._reference_from_policy:
            frozen["reference"] = self.reference()
        if "bco_pair" in self.dpo.loss_type:  # changes every step, so checkpointed
            frozen[REWARD_MEAN] = Frozen({"mean": np.zeros((), np.float32), "count": np.zeros((), np.float32)},
                                         checkpoint=True)
        return frozen

    def adapt_module(self, module: nnx.Module) -> nnx.Module:
        """Also keeps the trainable values a `lora_adapter_path` run starts from (loaded again on resume; those of
        `init_weights_from`, put in later, replace them: `_initial_weights`)."""
        module = super().adapt_module(module)
        if self.reference_is_initial_adapters:
            self._loaded_adapter = nnx.to_pure_dict(nnx.state(module, self.trainable_filter))
            if path := self.arguments.lora_adapter_path:  # read again on resume: refused if other values are there
                self.adapter_read = checked_adapter_values(self._loaded_adapter, adapter_path=path, config=self.lora,
                                                           resume_from=self._resume_from,
                                                           subject=self.initial_policy_subject)
        return module

    def configure_model(self) -> ConfiguredModel:
        """Also places a copy of the adapter values the policy starts from in `state.frozen` (`INITIAL_ADAPTERS`)."""
        configured, values, self._loaded_adapter = super().configure_model(), self._loaded_adapter, None
        return configured if values is None else with_initial_adapters(configured, values)

    # ------------------------------------------------------------------ the objective
    def pair_logps(self, model: nnx.Module, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`[B, 2]` summed completion log-probs, completion lengths and summed mean-over-vocab logits."""
        rows, _, length = batch["input_ids"].shape
        flat = lambda x: x.reshape((rows * 2, length))
        ids_NT, attention_NT, targets_NT, mask_NT = (flat(batch[k]) for k in ("input_ids", "attention_mask",
                                                                              "targets", "loss_mask"))
        if chunk_size := self.arguments.loss_chunk_size:  # the head runs a few tokens at a time: no [N*T, V]
            x_MD = model.hidden_states(ids_NT, attention_mask_BT=attention_NT)
            logps_M, mean_logit_M = map_token_chunks(logps_and_mean_logit, model.logits_from_hidden, x_MD,
                                                     targets_NT.reshape(-1), chunk_size)
            logps_NT, mean_logit_NT = logps_M.reshape(targets_NT.shape), mean_logit_M.reshape(targets_NT.shape)
        else:
            logits_NTV = model(ids_NT, attention_mask_BT=attention_NT)
            logps_NT = token_logps(logits_NTV, targets_NT, self.dpo.logps_chunk_size)
            mean_logit_NT = jnp.mean(logits_NTV.astype(jnp.float32), axis=-1)
        sums_N, counts_N = sequence_logps(logps_NT, mask_NT)
        mean_logits_N = jnp.sum(mean_logit_NT * mask_NT, axis=-1)
        return sums_N.reshape(rows, 2), counts_N.reshape(rows, 2), mean_logits_N.reshape(rows, 2)

    def reference_logps(self, model: nnx.Module, batch: Mapping[str, jax.Array],
                        frozen: Mapping[str, Any]) -> jax.Array | None:
        """`[B, 2]` reference log-probs (no gradient), or None for reference-free losses."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.reference_is_base:
            with adapters_disabled(model):
                return jax.lax.stop_gradient(self.pair_logps(model, batch)[0])
        if INITIAL_ADAPTERS in frozen:
            initial = with_values(model, self.trainable_filter, frozen[INITIAL_ADAPTERS])
            return jax.lax.stop_gradient(self.pair_logps(initial, batch)[0])
        if "reference" in frozen:
            return jax.lax.stop_gradient(self.pair_logps(frozen["reference"], batch)[0])
        return None

    def compute_loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, train: bool,
                     frozen: Mapping[str, Any]) -> LossOutput:
        if train and self.dpo.disable_dropout:  # the policy as the reference and evaluation run it
            model.eval()
        policy_B2, lengths_B2, logits_B2 = self.pair_logps(model, batch)
        reference_B2 = self.reference_logps(model, batch, frozen)
        if reference_B2 is None:  # reference-free losses: rewards are beta * policy log-probs, as TRL reports them
            reference_B2 = jnp.zeros_like(policy_B2)
        valid_B = (lengths_B2[:, 0] > 0).astype(jnp.float32)  # padding rows of the last eval batch weigh 0
        shown_B2 = reported_logps(self.dpo.loss_type, jax.lax.stop_gradient(policy_B2), lengths_B2)
        rewards_B2 = self.dpo.beta * (shown_B2 - reported_logps(self.dpo.loss_type, reference_B2, lengths_B2))
        delta = frozen[REWARD_MEAN]["mean"] if REWARD_MEAN in frozen else 0.0  # bco_pair's baseline, fixed in a step
        inputs = PairLogps(policy_B2[:, 0], policy_B2[:, 1], reference_B2[:, 0], reference_B2[:, 1],
                           lengths_B2[:, 0], lengths_B2[:, 1])
        losses_B = combined_loss(self.dpo.loss_type, self.dpo.loss_weights, inputs, beta=self.dpo.beta,
                                 label_smoothing=self.dpo.label_smoothing, gamma=self.dpo.simpo_gamma, delta=delta)
        pair = functools.partial(mean_over, weights=valid_B)
        metrics = {"rewards/chosen": pair(rewards_B2[:, 0]), "rewards/rejected": pair(rewards_B2[:, 1]),
                   "rewards/accuracies": pair(rewards_B2[:, 0] > rewards_B2[:, 1]),
                   "rewards/margins": pair(rewards_B2[:, 0] - rewards_B2[:, 1]),
                   "logps/chosen": pair(shown_B2[:, 0]), "logps/rejected": pair(shown_B2[:, 1]),
                   "logits/chosen": Mean(jnp.sum(logits_B2[:, 0] * valid_B), jnp.sum(lengths_B2[:, 0] * valid_B)),
                   "logits/rejected": Mean(jnp.sum(logits_B2[:, 1] * valid_B), jnp.sum(lengths_B2[:, 1] * valid_B))}
        return LossOutput(jnp.sum(losses_B * valid_B), jnp.sum(valid_B), metrics)

    # ------------------------------------------------------------------ TR-DPO
    def train_function(self):
        """The update, then (in the same program) `bco_pair`'s reward mean and TR-DPO's reference move."""
        update = super().train_function()
        if "bco_pair" in self.dpo.loss_type:
            update = functools.partial(update_then_track_rewards, update=update)
        if not self.dpo.sync_ref_model:
            return update
        return functools.partial(update_then_sync, update=update, alpha=self.dpo.ref_model_mixup_alpha,
                                 every=self.dpo.ref_model_sync_steps)

    def longest_batch_length(self) -> int | None:
        """The largest bucket a batch of pairs is padded to (the memory plan's shape)."""
        return self._pad.buckets[-1]


def logps_and_mean_logit(logits_MV: jax.Array, targets_M: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per token: float32 log p(target) and the mean logit over the vocabulary (the `logits/*` metrics)."""
    return target_logps(logits_MV, targets_M), jnp.mean(logits_MV.astype(jnp.float32), axis=-1)


def check_template_read(split: Any, path: str) -> bool:
    """Whether the training pairs render through the chat template. Prompt/chosen/rejected strings never do: they
    train exactly as without `chat_template_path`, warned about as SFT's string rows are, not refused, since the
    template still goes with the exported tokenizer."""
    if uses_chat_template(split):
        return True
    logger.warning("chat_template_path=%r: the training pairs are prompt/chosen/rejected strings, which no chat "
                   "template renders, so it changes no training token; it is only saved with the exported tokenizer. "
                   "Convert the pairs to message lists for the template to shape them.", path)
    return False


def uses_lora(args: TrainingArguments) -> bool:
    """LoRA is on with `lora_rank` or `lora_adapter_path` (`adapters.run_config` is then a `LoRAConfig`)."""
    return bool(args.lora_rank or args.lora_adapter_path)


def starts_from_trained_weights(args: TrainingArguments) -> bool:
    """A trained adapter (`lora_adapter_path`) or another run's weights (`init_weights_from`) to start from."""
    return bool(args.lora_adapter_path or args.init_weights_from)


def reference_from_policy(args: TrainingArguments, dpo: DPOArguments) -> bool:
    """Under LoRA, the default reference runs the policy's own weights: no second copy of the base."""
    return (uses_lora(args) and dpo.needs_reference and not dpo.precompute_ref_log_probs
            and not dpo.ref_model_name_or_path)


def check_arguments_for_dpo(args: TrainingArguments, dpo: DPOArguments) -> None:
    """What DPO refuses from the arguments alone (`DPOTrainer.check_inputs`, before anything is written): a text
    column (pairs are prompt/chosen/rejected), and under LoRA a reference its training would move. The adapter-off
    reference (`reference_is_base`) starts from no trained weights, so its LoRA config is the arguments'."""
    if args.text_column != "text":
        raise ArgumentError("text_column", f"{args.text_column!r} is not read by DPO, whose rows are "
                            "prompt/chosen/rejected (docs/dpo.md); leave text_column at 'text', or map another "
                            "layout with a formatting_func.")
    if not uses_lora(args):
        return
    if dpo.sync_ref_model:
        raise ArgumentError("sync_ref_model", "TR-DPO mixes the trained weights into a reference copy; under "
                                              "LoRA only adapters train. Drop sync_ref_model or lora_rank.")
    adapter_off = reference_from_policy(args, dpo) and not starts_from_trained_weights(args)
    if adapter_off and (args.lora_train_embeddings or args.lora_train_norms):
        raise ArgumentError("lora_train_embeddings" if args.lora_train_embeddings else "lora_train_norms",
                            "the adapter-off reference would move with the fully trained embeddings/norms; "
                            "pass --precompute_ref_log_probs or --ref_model_name_or_path for a fixed reference.")
