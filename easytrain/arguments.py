"""`TrainingArguments`: every knob of a run, with a default, a help string and a fast check.

The dataclass is the single source of defaults (`max_steps` and `num_train_epochs` are stored resolved by
`argument_values.resolve_run_length`, from what was given). It round-trips through JSON and YAML and is parsed
from the command line by `transformers.HfArgumentParser` (see `easytrain.config_io`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from easytrain import argument_checks, argument_values
from easytrain.argument_values import (DTYPES, NON_FINITE_POLICIES, OPTIMIZERS, SCHEDULES,  # noqa: F401
                                       STRATEGIES)
from easytrain.errors import ArgumentError


def _arg(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text shows in `--help` and in the generated reference."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainingArguments:
    """Everything a run needs, in one place. Defaults train the embedded arithmetic task."""

    # --- run -----------------------------------------------------------------------------------
    output_dir: str = _arg("outputs/easytrain", "Where checkpoints, logs, arguments and the exported model go.")
    overwrite_output_dir: bool = _arg(
        False, "Allow starting a fresh run, or resuming a checkpoint from outside output_dir, in an output_dir that "
        "holds another run (its checkpoints, logs or final_model): its logs and export are removed, its checkpoints "
        "removed (fresh run) or moved to superseded_checkpoints/ (resume)."
    )
    task: str = _arg(
        "lm",
        "What to train: a registered task name ('lm') or 'package.module:TrainerClass' "
        "for any class that implements easytrain.TrainerProtocol.",
    )
    seed: int = _arg(
        42, "Seed for parameter init, data order, the held-out validation split (validation_split_percentage) "
        "and dropout/sampling RNG: one seed for all of them. transformers' data_seed (the data order alone) has no "
        "counterpart: a new seed also draws other initial weights and holds out other rows.")

    # --- model ---------------------------------------------------------------------------------
    model_name_or_path: Optional[str] = _arg(
        None, "Directory (or hub name) of a pretrained model in Hugging Face format to start from."
    )
    init_weights_from: Optional[str] = _arg(
        None, "Start from these weights but a fresh optimizer, step count, RNG and data order (not a resume): an "
        "exported model directory (config.json + safetensors) or another run's checkpoint (its output_dir, "
        "checkpoints/ or checkpoints/STEP). Variables are matched by path and must have the model's shapes.")
    model_config: str = _arg(
        "tiny",
        "Architecture when training from scratch: a preset ('tiny', 'small') or a path to a config.json. "
        "Ignored when model_name_or_path is set.",
    )
    tokenizer_name: Optional[str] = _arg(
        None, "Tokenizer directory or hub name. Defaults to model_name_or_path, or to the task's own tokenizer."
    )
    # 'float16' stays in the Literal so that the parser accepts it and validate() says why it is refused.
    dtype: Literal["float32", "bfloat16", "float16"] = _arg(
        "float32", "Compute dtype of activations: 'float32' or 'bfloat16' ('float16' is refused: it needs "
        "loss scaling, which easytrain does not do). A module passed as model= (or built by create_module) computes "
        "in the dtype it was built with: float16 is refused, another dtype than this one is warned about.")
    param_dtype: Literal["float32", "bfloat16", "float16"] = _arg(
        "float32", "Storage dtype of parameters and optimizer state (master weights): 'float32' or 'bfloat16' "
        "('float16' is refused, as for dtype, and so are float16 parameters in a module passed as model= or built by "
        "create_module). bfloat16 halves their memory but keeps 8 significant bits: updates below about 1/256 of a "
        "weight round away, and the optimizer state is bfloat16 too (adam_beta2=0.999 is 1.0); warned about (under "
        "LoRA, whose adapters stay float32, only for lora_train_embeddings/lora_train_norms). For bfloat16 compute "
        "with float32 master weights: --dtype bfloat16 --param_dtype float32.")

    remat_policy: Literal["none", "full", "dots"] = _arg(
        "none", "Recompute decoder-layer activations in the backward pass to save memory: 'full' keeps only each "
        "layer's input, 'dots' also keeps matmul outputs; same values and gradients, more compute.")
    attention_implementation: Literal["xla", "dot_product_attention", "splash"] = _arg(
        "xla", "Training/eval attention: 'xla' applies a dense [B, T, S] mask to explicit scores; "
        "'dot_product_attention' passes causality, sliding windows and trailing padding to "
        "jax.nn.dot_product_attention as structure (cuDNN flash attention on CUDA GPUs in bfloat16/float16, "
        "XLA elsewhere); 'splash' runs jax's Pallas TPU flash-attention kernel with packing and padding as "
        "segment ids too (TPU; interpreted on CPU, refused on GPU); same values and gradients at real tokens. "
        "Decoding (generate) always uses 'xla'. See docs/models.md.")
    loss_chunk_size: int = _arg(
        0, "Apply the output head and cross-entropy (DPO: the log-probs) to this many tokens at a time, so the "
        "float32 [tokens, vocab] logits never exist (large vocabularies); 0 computes all the logits at once. Same "
        "values and gradients; the model needs hidden_states and logits_from_hidden (LlamaForCausalLM has them).")
    scan_layers: bool = _arg(
        False, "Store the decoder layers stacked ([L, ...] per weight) and run them as one jax.lax.scan (compiled "
        "once, so compile time stays flat with depth); same values and gradients. Checkpoints hold the stacked "
        "layout (a resume with the other setting converts them); Hugging Face and PEFT exports stay per layer. "
        "With attention_implementation 'dot_product_attention' or 'splash' every layer must use one sliding "
        "window: a config mixing windows (e.g. Qwen2's max_window_layers) is refused; use 'xla' for it.")
    compiler_options: str = _arg(
        "auto", "XLA options for the compiled train and eval steps (jax.jit's compiler_options), as 'name=value' "
        "pairs separated by commas, e.g. 'xla_cpu_enable_fast_math=true'. 'auto': easytrain's measured defaults "
        "for the backend (on AMD CPUs, YNNPACK library fusions off; XLA's own on Intel and other CPUs, GPU and "
        "TPU); '': XLA's own defaults. "
        "Given options replace the defaults.")
    compilation_cache_dir: str | None = _arg(
        "auto", "JAX's persistent compilation cache (process-wide), so a resumed or repeated run loads its compiled "
        "steps instead of compiling them: a directory; 'auto': the one JAX already has (JAX_COMPILATION_CACHE_DIR), "
        "else ~/.cache/easytrain/xla ($XDG_CACHE_HOME respected); '' or null: JAX's own setting (off unless set).")

    # --- LoRA (docs/lora.md) --------------------------------------------------------------------
    lora_rank: int = _arg(0, "Train LoRA adapters of this rank instead of every weight; 0 trains the full model.")
    lora_alpha: float = _arg(16.0, "LoRA scaling numerator: adapter outputs are multiplied by lora_alpha / lora_rank.")
    lora_dropout: float = _arg(0.0, "Dropout on the adapters' input during training, in [0, 1).")
    lora_target_modules: list[str] = _arg(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Dense layers that get adapters: module names (matching a Hugging Face module name or its suffix), "
        "'all-linear', or one regular expression over whole module names written 're:PATTERN' (in YAML/JSON "
        "also a plain string, as in PEFT).")
    lora_train_embeddings: bool = _arg(False, "With LoRA, also train the input embedding and the output head in full.")
    lora_train_norms: bool = _arg(False, "With LoRA, also train the RMSNorm scales.")
    lora_use_rslora: bool = _arg(False, "Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_rank).")
    lora_adapter_path: Optional[str] = _arg(
        None, "Start from this PEFT adapter directory (adapter_config.json + adapter_model.safetensors) on the "
        "model_name_or_path base; its adapter_config.json decides rank, alpha and targets.")
    lora_export: Literal["adapter", "merged", "both"] = _arg(
        "both", "What save_pretrained writes for a LoRA run: the merged model in Hugging Face layout, a PEFT "
        "adapter in its adapter/ subdirectory, or both.")

    # --- data ----------------------------------------------------------------------------------
    dataset_name: Optional[str] = _arg(None, "A dataset name or local directory for datasets.load_dataset.")
    dataset_config_name: Optional[str] = _arg(None, "The dataset's configuration name, if it has several.")
    train_file: Optional[str] = _arg(None, "Local training file: .json, .jsonl, .csv, .parquet or .txt.")
    validation_file: Optional[str] = _arg(None, "Local validation file, same formats as train_file (needs train_file).")
    text_column: str = _arg(
        "text", "Name of the dataset column holding the raw text (the lm task; SFT plain-text rows, renamed `text`). "
        "SFT conversations or prompt-completion rows and DPO refuse any value other than 'text'.")
    validation_split_percentage: int = _arg(
        5, "Percent of the training set held out for evaluation when there is no validation split."
    )
    max_length: int = _arg(128, "Sequence length of every training block, in tokens.")
    max_train_samples: Optional[int] = _arg(
        None, "Train on the first N training examples only (debugging); unset: all. The lm task keeps the first N "
        "blocks of max_length + 1 tokens, tokenising the documents from the first on until they fill them, not the "
        "whole split (pre-tokenized rows: the first N rows); sft and dpo keep the first N rows (conversations, "
        "prompt-completion pairs, preference pairs) before tokenising. "
        "With a held-out split (validation_split_percentage > 0 and no validation split given), the rows left for "
        "training are in a seeded shuffled order, so the first N are a sample chosen by seed.")
    max_eval_samples: Optional[int] = _arg(
        None, "Evaluate on the first N evaluation examples only; unset: all. As max_train_samples: for the lm task "
        "the first N token blocks of the tokenised validation split, for sft and dpo its first N rows; a held-out "
        "split is in a seeded shuffled order, so its first N are a sample chosen by seed.")
    preprocessing_num_workers: Optional[int] = _arg(None, "Processes used to tokenise the dataset; unset: this one.")

    # --- optimisation --------------------------------------------------------------------------
    num_train_epochs: Optional[int] = _arg(
        None, "Passes over the training set. Given without max_steps (as in transformers), it decides the run's "
        "length (max_steps becomes -1); with a positive max_steps it has no effect (warned about, unless it is 3). "
        "Unset: 3, used only where max_steps <= 0. Each epoch is whole global batches of a fresh shuffle: the "
        "remainder of the rows divided by train_batch_size is left out of it (other rows each epoch; 31 rows at "
        "batch 16 train 16 in one step), warned about at set-up.")
    max_steps: Optional[int] = _arg(
        None, "Total optimizer updates; <= 0 (e.g. transformers' -1) trains for num_train_epochs instead. Unset: "
        "1500, or -1 when num_train_epochs is given. A positive max_steps given with num_train_epochs decides the "
        "length, and a num_train_epochs other than 3 is warned about. Stored resolved (arguments.json, checkpoints), "
        "so a rerun trains the same length.")
    train_batch_size: int = _arg(
        16, "Global batch size: examples per optimizer update, summed over devices, hosts and micro-batches."
    )
    eval_batch_size: int = _arg(16, "Global batch size for evaluation.")
    gradient_accumulation_steps: int = _arg(
        1, "Split each global batch into this many micro-batches, accumulated inside the compiled step."
    )
    learning_rate: float = _arg(
        1e-3, "Peak learning rate. The default suits small models trained from scratch; fine-tuning a "
        "pretrained model usually wants 1e-5 to 1e-4.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = _arg(
        "cosine", "Decay after warmup, counted in optimizer updates (never micro-batches). Every schedule warms up "
        "(warmup_steps, warmup_ratio): 'constant' is transformers' 'constant_with_warmup'. transformers' other names "
        "are refused naming the equivalent, where there is one (docs/porting.md).")
    warmup_steps: int = _arg(0, "Linear warmup length in optimizer updates; takes precedence over warmup_ratio. "
                                "Update k (from 1) of the warmup uses learning_rate * (k - 1) / warmup_steps, so the "
                                "first is 0 and the peak comes at update warmup_steps + 1. Cut to the run's length: "
                                "with warmup_steps >= max_steps the peak is never applied (the last update uses "
                                "(max_steps - 1) / max_steps of it).")
    warmup_ratio: float = _arg(0.05, "Warmup as a fraction of the total optimizer updates, in [0, 1], rounded down "
                                     "(0.05 of 10 updates is no warmup; Hugging Face rounds up). 1.0 warms up over "
                                     "the whole run, as warmup_steps >= max_steps does: the peak is never applied.")
    optimizer: Literal["adamw", "adafactor", "lion", "sgd"] = _arg(
        "adamw", "The update rule (optax's). 'adamw': Adam with decoupled weight decay; reads adam_beta1, adam_beta2, "
        "adam_epsilon. 'lion': the sign of interpolated momenta; reads adam_beta1, adam_beta2 (no epsilon). 'sgd': "
        "reads sgd_momentum. 'adafactor': optax's Adafactor with its defaults, reading none of them: no momentum, "
        "second moments factored only for arrays whose two longest axes are both >= 128 (others keep a full one), "
        "updates clipped at RMS 1 and scaled by the parameter's RMS (at least 1e-3), so its learning_rate is a "
        "step relative to the weights' size. transformers.Trainer builds its Adafactor (optim='adafactor') with "
        "scale_parameter=False, relative_step=False: learning_rate is an absolute step there, and every matrix is "
        "factored, so the same learning_rate is another step here; LoRA's B starts at zero, so its adapters barely "
        "move (warned: use 'adamw' or 'lion' with LoRA). A field the chosen optimizer does not read is warned about.")
    weight_decay: float = _arg(
        0.0, "Decoupled weight decay, multiplied by the learning rate (AdamW, Lion, Adafactor alike); L2 for SGD. "
        "Applies to arrays of 2 or more dimensions only (matrices, kernels, embeddings), never to biases or norm "
        "scales: as transformers' Trainer leaves them out by name, here by shape. To decay others, override "
        "configure_optimizer in a trainer (easytrain.optim.decay_mask is the default rule).")
    adam_beta1: float = _arg(0.9, "beta1 of AdamW and Lion, in [0, 1).")
    adam_beta2: float = _arg(0.999, "beta2 of AdamW and Lion, in [0, 1).")
    adam_epsilon: float = _arg(1e-8, "epsilon of AdamW (> 0); Lion, SGD and Adafactor do not read it.")
    sgd_momentum: float = _arg(0.9, "Momentum of SGD, in [0, 1) (0 for plain SGD).")
    max_grad_norm: float = _arg(1.0, "Clip gradients to this global norm; 0 disables clipping.")
    non_finite_policy: Literal["skip", "stop", "ignore"] = _arg(
        "skip", "On a NaN/Inf loss or gradient: 'skip' the update (counted in the logs), 'stop', or 'ignore'."
    )

    # --- logging, evaluation, checkpoints ------------------------------------------------------
    logging_steps: int = _arg(10, "Fetch metrics from the device and log them every N optimizer updates; a checkpoint "
                                  "also ends a logging window (save_steps 6, logging_steps 4: records at 4, 6, 8, 12), "
                                  "so a resumed run logs the same records as one that never stopped.")
    eval_strategy: Literal["no", "steps", "epoch"] = _arg("steps", "When to evaluate during training.")
    eval_steps: int = _arg(250, "Evaluate every N updates when eval_strategy='steps'.")
    save_strategy: Literal["no", "steps", "epoch"] = _arg(
        "steps", "When to checkpoint during training (a final checkpoint is written unless 'no')."
    )
    save_steps: int = _arg(500, "Checkpoint every N updates when save_strategy='steps'.")
    save_total_limit: Optional[int] = _arg(3, "Keep the newest N checkpoints (plus the best one, if tracked).")
    async_checkpointing: bool = _arg(True, "Write checkpoints in the background while training continues.")
    resume_from_checkpoint: Optional[str] = _arg(
        None, "'latest' (or 'true') to resume the newest checkpoint in output_dir, or a checkpoint path. "
        "Resuming an older step of this output_dir moves its newer checkpoints, and the final_model and "
        "results.json they led to, to superseded_checkpoints/."
    )
    allow_data_order_change: bool = _arg(
        False, "Resume even though seed, batch size, dataset (its arguments, its rows or their content), tokenizer or "
        "max_length changed since the checkpoint; the data then continues in the order the new settings give at the "
        "restored step (not exact)."
    )
    metric_for_best_model: Optional[str] = _arg(
        None, "Eval metric (e.g. 'eval_loss'; 'accuracy' means 'eval_accuracy') used to keep the best checkpoint and "
        "for early stopping; needs an eval_strategy other than 'no' and evaluation data.")
    greater_is_better: Optional[bool] = _arg(
        None, "Whether a larger metric_for_best_model is better. Unset: False for a name ending in 'loss' or "
        "'perplexity', or whose last word names a lower-is-better measure ('ppl', 'nll', 'bpb', 'bits_per_byte', "
        "'error', 'error_rate', 'mse', 'mae', 'wer', 'cer', 'ter', 'distance', 'divergence', 'kl', ...: "
        "docs/metrics.md lists them), else True (with a warning for a name of no known direction), inferred and saved "
        "unset (null) in arguments.json, so a rerun with another metric infers again. A value against the name (True "
        "for a loss, False for an accuracy) is warned about.")
    load_best_model_at_end: bool = _arg(
        False, "After training, restore the checkpoint with the best metric_for_best_model (before the export)."
    )
    early_stopping_patience: Optional[int] = _arg(
        None, "Stop after this many evaluations without improvement of metric_for_best_model (or eval_loss); needs an "
        "eval_strategy other than 'no'."
    )
    eval_metrics: Optional[list[str]] = _arg(
        None, "Evaluation metrics besides eval_loss: 'accuracy' and 'perplexity' (on device, from the loss's "
        "predictions), 'exact_match' (greedy answers to held-out prompts, where the trainer has them). Unset: "
        "accuracy and perplexity when the loss gives predictions, exact_match where available; 'none' (or an empty "
        "list): none.")
    report_to: list[str] = _arg(
        ["tensorboard", "jsonl"], "Metric sinks: any of 'tensorboard', 'jsonl', 'csv', 'wandb', 'mlflow', or 'none'. "
        "'wandb' and 'mlflow' need their extras (pip install 'easytrain[wandb]' / 'easytrain[mlflow]').")
    progress_start: float = _arg(
        0.0, "Job progress (output_dir/job.json) at this run's first step, in percent: with progress_end, maps the "
        "run into a range, e.g. 50 to 100 for the second stage of a pipeline.")
    progress_end: float = _arg(100.0, "Job progress at this run's last step, in percent (see progress_start).")
    stop_file: str = _arg(
        "STOP", "A file of this name appearing in output_dir stops the run after the current step, with a "
        "checkpoint and job status 'stopped' (the file is then removed); '' turns it off.")
    disable_progress_bar: bool = _arg(False, "Print log lines only, without a live progress bar (nor the datasets "
                                      "library's bars while data, or a set given to evaluate, is prepared).")
    profile_steps: int = _arg(
        0, "Record a jax.profiler trace of this many training steps, from profile_start_step on, into "
        "output_dir/tensorboard/plugins/profile/ (TensorBoard's profile tab; the perfetto_trace.json.gz beside it "
        "opens at https://ui.perfetto.dev); 0: no trace. See docs/metrics.md.")
    profile_start_step: int = _arg(
        3, "The first traced step with profile_steps (the first update is step 1, which also compiles the train "
        "step).")
    save_pretrained_at_end: bool = _arg(
        True, "Export the final model in Hugging Face format to output_dir/final_model."
    )

    # --- devices -------------------------------------------------------------------------------
    data_parallel_size: int = _arg(-1, "Size of the 'data' mesh axis; -1 takes the devices the other axes leave (1 "
                                       "when fsdp_size or tensor_parallel_size is -1).")
    fsdp_size: int = _arg(1, "Size of the 'fsdp' mesh axis (parameters and optimizer state sharded); -1 takes the "
                             "devices left over.")
    tensor_parallel_size: int = _arg(1, "Size of the 'tensor' mesh axis (matmuls split across devices); -1 takes the "
                                        "devices left over (not with fsdp_size -1).")
    coordinator_address: Optional[str] = _arg(
        None, "host:port of process 0 for a multi-process run (SLURM and Cloud TPU launches are detected "
        "without it).")
    num_processes: Optional[int] = _arg(None, "Number of processes (usually one per host) in a multi-process run.")
    process_id: Optional[int] = _arg(None, "This process's index in [0, num_processes).")

    def __post_init__(self) -> None:
        validate(self)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingArguments":
        """Build from a dict, rejecting unknown keys with a suggestion."""
        check_known_fields(values, source="the configuration")
        return cls(**values)

    @property
    def uses_epochs(self) -> bool:
        return self.max_steps <= 0


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainingArguments)]


def check_known_fields(values: dict[str, Any], *, source: str) -> None:
    """An unknown key is refused as a config file's is: a transformers name with its easytrain setting (`data_seed`
    is `seed`, not `dataset_name`), else the closest name."""
    from easytrain.suggestions import as_keys, unknown_name_hint

    known = field_names()
    for key in values:
        if key not in known:
            hint = unknown_name_hint(key, values[key], known, as_keys)
            raise ArgumentError(key, f"unknown argument in {source}. {hint}")


def validate(args: TrainingArguments) -> None:
    """Fail before any compute, naming the field and the fix."""
    argument_checks.normalize(args, TrainingArguments)  # a string for a list; YAML's `no` (False) for 'no'
    argument_checks.check_types(args, TrainingArguments)  # first: the value checks compare values
    argument_checks.check_not_blank(args, TrainingArguments)  # '' is no path: never read as unset
    argument_values.resolve_run_length(args)  # max_steps and num_train_epochs as given -> the values that decide
    argument_checks.resolve_best_metric(args)  # eval_ prefix, greater_is_better from the name if unset
    argument_values.check_values(args)
