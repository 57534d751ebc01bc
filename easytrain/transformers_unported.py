"""transformers.TrainingArguments fields easytrain does not take (`UNTAKEN`), each with what easytrain offers instead
or why none is needed, and the `Ported` record `easytrain.suggestions` answers every transformers name with: a bare
"see --help" would leave a user porting a config to guess, and spelling alone would point some to a look-alike that
trains differently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: (field, value) pairs to write; a value of None: the field alone (its value is the user's to choose).
Settings = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Ported:
    """A transformers setting as easytrain spells it: `settings` (none: easytrain has no equivalent) and `why`, how
    the two differ or why none is needed."""

    settings: Settings
    why: str


def is_on(value: Any) -> bool:
    """A transformers boolean as given: a bare flag (None) or anything but transformers' false strings is on."""
    return value is not False and str(value).strip().lower() not in ("false", "f", "no", "n", "0", "off")


def switch(name: str, on: Ported, default: Any) -> Callable[[Any], Ported]:
    """A transformers boolean: `on` when it is set, else `name` at its default (nothing to write)."""
    return lambda value: on if is_on(value) else Ported(((name, default),), "It is the default: leave it out")


def fixed(why: str) -> Callable[[Any], Ported]:
    """A setting easytrain has no field for, whatever its value: the why alone (no "Did you mean")."""
    return lambda value: Ported((), why)


def pointing(field: str, why: str) -> Callable[[Any], Ported]:
    """A setting whose nearest easytrain field is `field` (the user's to set), whatever its value."""
    return lambda value: Ported(((field, None),), why)


_CUSTOM = "in a trainer (docs/custom_trainer.md)"
_MESH = ("There is no such setting here: a run is placed on a device mesh of data_parallel_size x fsdp_size x "
         "tensor_parallel_size devices, fsdp_size sharding parameters and optimizer state (docs/scaling.md)")
_HUB = ("There is no pushing to the Hub here: save_pretrained_at_end exports output_dir/final_model (config.json "
        "and safetensors), which `hf upload` pushes")
_DATA = ("There is no such setting here: each process gathers its batches, in the order seed and the step fix, from "
         "rows tokenised before training (preprocessing_num_workers processes tokenise), in two reader threads that "
         "keep four batches ready (easytrain.data.loader)")
_FULL_EVAL = ("There is no such setting here: evaluation computes in dtype as training does, with the parameters in "
              "param_dtype, so dtype bfloat16 (and param_dtype bfloat16, for all of it) changes training too; float16 "
              "is refused, as it needs loss scaling")
_LIGER = ("There is no such setting here: XLA compiles and fuses each step itself, and loss_chunk_size computes the "
          "output head and cross-entropy a chunk of tokens at a time, so the full logits never exist (as Liger's "
          "fused linear cross-entropy), with the same values and gradients as all at once")
_LOG_LEVEL = ("There is no such setting here: easytrain's messages go through the Python logger 'easytrain', at INFO "
              "on `easytrain train`'s stderr; logging.getLogger('easytrain').setLevel(...) in a script of your own "
              "sets another level")
_GATHERED = ("There is no such setting here, and none is needed: evaluation gathers no predictions or inputs across "
             "batches or devices, it merges each batch's metric sums on the device; a metric of your own is a "
             "compute_metrics(predictions, batch) override, which sees each batch (docs/metrics.md)")
_BY_LENGTH = ("There is no such setting here: rows are never grouped by length, each epoch is a shuffle from seed; "
              "for less padding, the sft task's packing fills each row with several examples, and without it each "
              "batch is padded to the smallest bucket length that holds its longest example (to max_length in a "
              "multi-process run, whose processes run one shape: docs/sft.md)")
_DDP = ("There is no such setting here, and none is needed: data parallelism is the compiled step sharded over the "
        "mesh's data axis, its gradient reductions placed and scheduled by XLA; there is no DistributedDataParallel "
        "wrapper to tune (docs/scaling.md)")
_RUN = ("There is no such setting here: `easytrain train` trains, then evaluates once more for results.json; from "
        "Python, trainer.evaluate() (or evaluate(dataset)) evaluates without training")


def _trackio(value: Any) -> Ported:
    from easytrain.sinks import REPORT_TO_CHOICES  # read on this error only

    return Ported((), f"There is no Trackio sink here: report_to takes {', '.join(REPORT_TO_CHOICES)}")


def _prediction_loss_only(value: Any) -> Ported:
    if not is_on(value):
        return Ported((), "There is no such setting here, and none is needed: evaluation never gathers predictions")
    return Ported((("eval_metrics", "none"),), "Evaluation never gathers predictions; eval_metrics none reports "
                                               "eval_loss and the loss's own metrics alone")


#: transformers.TrainingArguments fields easytrain does not take: what it offers instead, or why none is needed.
#: Spelling alone would point some to a look-alike that does something else (`local_rank` to `lora_rank`).
UNTAKEN: Mapping[str, Callable[[Any], Ported]] = {
    "lr_scheduler_kwargs": fixed(
        "There is no such setting here: the schedules ('constant', 'linear', 'cosine') take no arguments besides "
        "warmup_steps or warmup_ratio; 'cosine' is cosine_with_restarts at num_cycles=1, 'linear' polynomial at "
        f"power=1.0 (down to 0, not lr_end); for another schedule, override configure_schedule(total_steps) {_CUSTOM}"),
    "optim_args": fixed(
        "There is no such setting here: each optimizer setting is a field of its own: adam_beta1, adam_beta2 and "
        "adam_epsilon (adamw; lion reads the betas), sgd_momentum (sgd), weight_decay and max_grad_norm (all "
        "four); adafactor's others are optax's defaults. For other options, override "
        f"configure_optimizer(schedule) {_CUSTOM}"),
    "optim_target_modules": fixed(
        "There is no such setting here: it chooses the modules transformers' GaLore and APOLLO optimizers update, "
        "which easytrain does not have (lora_target_modules chooses where LoRA adapters go: another thing)"),
    "auto_find_batch_size": fixed(
        "There is no such setting here: train_batch_size is used as given, never lowered after running out of "
        "memory; gradient_accumulation_steps splits it into micro-batches, which need less memory"),
    "logging_strategy": pointing("logging_steps", (
        "Logging is by updates only: every logging_steps updates (transformers' 'steps'), a checkpoint and the last "
        "update also ending a logging window; there is no 'epoch' logging")),
    "logging_first_step": fixed(
        "There is no such setting here: records come every logging_steps updates, at each checkpoint and at the last "
        "update (logging_steps 1 logs the first update by itself)"),
    "eval_delay": fixed("There is no such setting here: evaluation follows eval_strategy from the start (every "
                         "eval_steps updates, or every epoch)"),
    "eval_on_start": fixed("There is no such setting here: the first evaluation comes after eval_steps updates "
                            "(eval_strategy 'steps') or at the first epoch's end ('epoch')"),
    "batch_eval_metrics": fixed(
        "There is no such setting here, and none is needed: the eval_metrics of the loss (accuracy, perplexity) "
        "merge each batch's sums and counts on the device, never computed from every prediction gathered at once"),
    "enable_jit_checkpoint": fixed(
        "There is no such setting here, and none is needed: a SIGTERM (or SIGINT) during training ends the run "
        "after the current step with a checkpoint, whatever save_steps, unless save_strategy is 'no' (then it "
        "stops with none), exit status 75 (docs/checkpoints.md)"),
    "restore_callback_states_from_checkpoint": fixed(
        "There is no such setting here: a resume gives each callback its state_dict back, matched by class "
        "(docs/api/callbacks.md)"),
    **dict.fromkeys(("push_to_hub", "hub_strategy", "hub_model_id", "hub_token", "hub_private_repo",
                     "hub_always_push", "hub_revision"), fixed(_HUB)),
    **dict.fromkeys(("accelerator_config", "parallelism_config", "fsdp_config", "deepspeed"), fixed(_MESH)),
    "fsdp": pointing("fsdp_size", (
        "transformers' fsdp takes FSDP's options ('full_shard', 'offload', ...); fsdp_size here is the number of "
        "devices parameters and optimizer state are sharded over (-1: those the other mesh axes leave; "
        "docs/scaling.md)")),
    "label_names": fixed("There is no such setting here: each task makes its own targets from its rows "
                          "(docs/tasks.md)"),
    "train_sampling_strategy": fixed(
        "There is no such setting here: the training rows are shuffled anew every epoch, from seed (transformers' "
        "'random'); there is no 'sequential' or 'group_by_length'"),
    "dataloader_drop_last": fixed(
        "There is no such setting here: an epoch is floor(rows / train_batch_size) updates of full batches, as with "
        "transformers' dataloader_drop_last true; the rows left over are other ones in each epoch, shuffled anew "
        "(docs/porting.md)"),
    **dict.fromkeys(("torch_compile", "torch_compile_backend", "torch_compile_mode"), fixed(
        "There is no such setting here, and none is needed: the train and eval steps are always compiled by XLA "
        "(jax.jit); compiler_options passes XLA's own options")),
    "use_cpu": fixed("There is no such setting here: JAX runs on the accelerator it finds; JAX_PLATFORMS=cpu in the "
                      "environment runs on the CPU"),
    "ignore_data_skip": fixed(
        "There is no such setting here: a resume continues the data where the checkpoint left it (with "
        "allow_data_order_change, in the order changed data settings give)"),
    "save_only_model": fixed(
        "There is no such setting here: checkpoints always hold the optimizer state and the data position, for an "
        "exact resume; save_pretrained_at_end exports the model alone to output_dir/final_model"),
    "local_rank": pointing("process_id", (
        "A multi-process run (one process per host) is set up by coordinator_address, num_processes and "
        "process_id; SLURM and Cloud TPU launches are detected without them")),
    "average_tokens_across_devices": fixed(
        "There is no such setting here, and none is needed: the loss and its gradients are normalised once by the "
        "supervised-token count of the whole global batch (every device, host and micro-batch), as transformers' "
        "average_tokens_across_devices (on by default) does"),
    "label_smoothing_factor": fixed(
        "There is no such setting here: the language-model loss is plain cross-entropy; for label smoothing, "
        f"override compute_loss(model, batch, rng, train, frozen) {_CUSTOM}. The dpo task's label_smoothing is "
        "another thing: the share of preference labels assumed flipped"),
    **dict.fromkeys(("bf16_full_eval", "fp16_full_eval"), fixed(_FULL_EVAL)),
    "tf32": fixed("There is no such setting here: JAX computes float32 matmuls in TF32 on NVIDIA GPUs that have it, "
                  "by default (transformers' tf32 true); JAX_DEFAULT_MATMUL_PRECISION=float32 in the environment asks "
                  "for full float32 (tf32 false)"),
    **dict.fromkeys(("use_liger_kernel", "liger_kernel_config"), fixed(_LIGER)),
    "use_cache": fixed("There is no such setting here, and none is needed: training and evaluation run whole "
                       "sequences with no KV cache; generation (exact_match) always decodes with one"),
    "neftune_noise_alpha": fixed(
        "There is no such setting here: no noise is added to the input embeddings (NEFTune); a module of your own "
        "could add it in training mode (create_module, docs/custom_trainer.md)"),
    "torch_empty_cache_steps": fixed(
        "There is no such setting here, and none is needed: XLA plans each compiled step's device memory itself, "
        "with no PyTorch cache to empty; XLA_PYTHON_CLIENT_PREALLOCATE=false in the environment stops JAX from "
        "reserving most of a GPU's memory at start"),
    "log_on_each_node": fixed("There is no such setting here: in a multi-process run only process 0 writes the logs, "
                              "TensorBoard events and arguments.json (docs/scaling.md)"),
    "logging_nan_inf_filter": fixed(
        "There is no such setting here: a logging window's loss is its summed loss over its token count, not finite "
        "when one of its steps' was; non_finite_policy decides what that step does ('skip', the default, leaves "
        "the parameters as they were and counts it in skipped_steps)"),
    "include_num_input_tokens_seen": fixed(
        "There is no such setting here: the lm and sft tasks' train records log num_tokens, the logging window's "
        "supervised (target) tokens, not input tokens as transformers counts, and tokens_per_second; num_tokens "
        "summed over metrics.jsonl's train rows is the tokens trained on so far"),
    **dict.fromkeys(("log_level", "log_level_replica"), fixed(_LOG_LEVEL)),
    "disable_tqdm": switch("disable_progress_bar", Ported((("disable_progress_bar", True),), (
        "It prints log lines only, without a live progress bar (nor the datasets library's bars)")), False),
    "run_name": fixed("There is no such setting here: a W&B run is named by WANDB_NAME in the environment (unset: "
                      "output_dir's folder name), an MLflow run after output_dir's folder name"),
    "project": fixed("There is no such setting here: transformers' project is Trackio's, which easytrain does not "
                     "report to; the W&B project is WANDB_PROJECT in the environment (unset: 'easytrain'), the MLflow "
                     "experiment MLFLOW_EXPERIMENT_NAME (unset: 'easytrain')"),
    **dict.fromkeys(("trackio_space_id", "trackio_bucket_id", "trackio_static_space_id"), _trackio),
    "prediction_loss_only": _prediction_loss_only,
    **dict.fromkeys(("eval_do_concat_batches", "eval_use_gather_object", "include_for_metrics"), fixed(_GATHERED)),
    "save_on_each_node": fixed(
        "There is no such setting here: every process writes its share of each checkpoint into one shared "
        "output_dir that every host sees (checked before any compute), and process 0 alone the logs and the "
        "exported model (docs/scaling.md)"),
    "full_determinism": fixed(
        "There is no such setting here: every random draw (initial weights, data order, dropout) comes from seed "
        "through explicit JAX keys; on GPUs, XLA_FLAGS=--xla_gpu_deterministic_ops=true in the environment also "
        "makes XLA's kernels deterministic (slower)"),
    **dict.fromkeys(("dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_persistent_workers",
                     "dataloader_multiprocessing_context", "dataloader_in_order"), fixed(_DATA)),
    "dataloader_pin_memory": fixed("There is no such setting here, and none is needed: JAX copies each batch from "
                                   "host memory to the devices itself"),
    "remove_unused_columns": fixed(
        "There is no such setting here, and none is needed: each task tokenises only the columns its data format "
        "names (text_column for the lm task; docs/sft.md, docs/dpo.md), so no other column reaches the model"),
    **dict.fromkeys(("length_column_name", "group_by_length"), fixed(_BY_LENGTH)),
    **dict.fromkeys(("ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
                     "ddp_static_graph"), fixed(_DDP)),
    "ddp_backend": fixed("There is no such setting here: JAX uses its platform's collectives (NCCL on NVIDIA GPUs); "
                         "processes join through jax.distributed.initialize, from coordinator_address, num_processes "
                         "and process_id or a detected SLURM or Cloud TPU launch"),
    "ddp_timeout": fixed("There is no such setting here: processes join through jax.distributed.initialize at JAX's "
                         "own timeouts; docs/scaling.md says how long a process waits for one that failed"),
    "debug": fixed("There is no such setting here: non_finite_policy decides what a NaN or Inf loss or gradient does "
                   "('skip', 'stop', 'ignore'); JAX_DEBUG_NANS=true in the environment finds the operation that made "
                   "one, and profile_steps records a jax.profiler trace"),
    "skip_memory_metrics": fixed(
        "There is no such setting here: the first train record logs planned_memory_mib and planned_temp_mib, the "
        "compiled step's memory per device as XLA plans it (where the backend reports it), at no cost to the steps "
        "(docs/metrics.md)"),
    **dict.fromkeys(("do_train", "do_eval"), fixed(_RUN)),
    "do_predict": fixed(f"There is no prediction step here. {_RUN.removeprefix('There is no such setting here: ')}"),
}
