"""Turn `TrainingArguments` into a tokenizer, a model config and tokenised datasets.

Every check here runs before any model is initialised or compiled.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import datasets
import huggingface_hub
import jax
import numpy as np
import transformers

from easytrain import sharding
from easytrain.arguments import TrainingArguments
from easytrain.callbacks import Callback, EarlyStopping
from easytrain.checkpoint import CHECKPOINTS_DIRNAME, CheckpointManager
from easytrain.data import load_text_datasets
from easytrain.data.errors import DataError
from easytrain.data.loader import count_rows
from easytrain.data.order import warn_rows_left_out
from easytrain.data.progress_bars import datasets_progress_bars
from easytrain.data.sources import plain_rows
from easytrain.errors import ArgumentError
from easytrain.models.families import ConfigError, check_buildable
from easytrain.models.hf_io import CONFIG_REFUSALS
from easytrain.models.llama import check_config_token_ids
from easytrain.models.presets import llama_config
from easytrain.models.token_ids import file_fix
from easytrain.tasks import arithmetic
from easytrain.trainers import given_data
from easytrain.trainers.batch_fields import check_collated
from easytrain.trainers.job_callback import JobCallback
from easytrain.trainers.row_sources import row_sources
from easytrain.trainers.switches import check_scan_windows

logger = logging.getLogger("easytrain")
DEFAULT_PAD_TOKEN = "<pad>"
#: Set while `prepared_rows` runs: `uses_embedded_data` notes there that the rows are the embedded corpus.
_embedded_marks: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("easytrain_embedded", default=None)
Loaded = TypeVar("Loaded")


def check_pretrained_path(field: str, name: str | os.PathLike) -> None:
    """Refuse, before anything is loaded or downloaded, a value that is neither an existing local path nor
    something the Hugging Face Hub could resolve (a `name` or `namespace/name` id)."""
    if Path(name).expanduser().exists():
        return
    try:
        huggingface_hub.utils.validate_repo_id(os.fspath(name))
    except huggingface_hub.errors.HFValidationError as error:
        raise ArgumentError(field, f"{os.fspath(name)!r} does not exist, and it is not a Hugging Face Hub id "
                                   "(namespace/name) either; check the path, or pass a hub model id.") from error


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return " (HF_HUB_OFFLINE=1 is set: only hub models already in the cache resolve)" if offline else ""


#: transformers' ways of saying "cannot load this": files and the hub (OSError), and a config.json whose JSON or
#: values it refuses (`hf_io.CONFIG_REFUSALS`: ValueError, its dataclass validation, a RoPE key missing, ...).
LOAD_ERRORS = (OSError, *CONFIG_REFUSALS)


def load_pretrained(field: str, name: str | os.PathLike, load: Callable[[str], Loaded], what: str, fix: str) -> Loaded:
    """`load(name)` (a transformers `from_pretrained`), with a missing path, an unresolvable hub id and
    unreadable files refused as an `ArgumentError` naming `field` (the loader's exception chained)."""
    check_pretrained_path(field, name)
    try:
        return load(os.fspath(name))
    except LOAD_ERRORS as error:
        reason = (str(error).strip().splitlines() or [""])[0].rstrip(" :.")
        hint = "" if Path(name).expanduser().exists() else _offline_hint()
        raise ArgumentError(field, f"cannot load {what} from {os.fspath(name)!r}{hint}: "
                                   f"{type(error).__name__}: {reason}. {fix}") from error


def uses_embedded_data(args: TrainingArguments, dataset_train: Any, dataset_eval: Any = None) -> bool:
    """No data anywhere: train on the arithmetic corpus that ships with easytrain. Data given in a way that
    would be ignored (an eval set alone, two training sources) is refused here, before anything is built. Every
    built-in `prepare_datasets` calls it: it marks the given data read (`given_data`)."""
    given_data.mark_read()
    check_data_sources(args, dataset_train, dataset_eval)
    embedded = not _train_sources(args, dataset_train)
    if embedded and (marks := _embedded_marks.get()) is not None:
        marks.append(True)
    return embedded


def _train_sources(args: TrainingArguments, dataset_train: Any) -> list[str]:
    given = {"dataset_train": dataset_train is not None, "train_file": bool(args.train_file),
             "dataset_name": bool(args.dataset_name)}
    return [name for name, present in given.items() if present]


def check_data_sources(args: TrainingArguments, dataset_train: Any, dataset_eval: Any) -> None:
    """One training source at most, one eval set at most, and no eval set without training data: any other
    combination would silently drop one of them."""
    train = _train_sources(args, dataset_train)
    evaluation = [name for name, present in (("dataset_eval", dataset_eval is not None),
                                             ("validation_file", bool(args.validation_file))) if present]
    if len(train) > 1:
        raise DataError(f"Got several training sources ({' and '.join(train)}), of which one would be ignored; "
                        "pass exactly one of dataset_train, train_file or dataset_name.")
    if len(evaluation) > 1:
        raise DataError("Got two evaluation sets (dataset_eval and validation_file), of which one would be ignored; "
                        "pass one.")
    if evaluation and not train:
        raise DataError(f"`{evaluation[0]}` was given without training data; pass dataset_train, train_file or "
                        "dataset_name too (the embedded arithmetic data is used only when no data is given at all).")


def build_tokenizer(args: TrainingArguments, *, embedded: bool) -> transformers.PreTrainedTokenizerBase:
    name = args.tokenizer_name or args.model_name_or_path
    if name is None:
        if embedded:
            return arithmetic.build_arithmetic_tokenizer()
        raise ArgumentError("tokenizer_name", "training on your own data needs a tokenizer: pass "
                                              "--tokenizer_name DIR (or --model_name_or_path of a pretrained model).")
    return load_tokenizer("tokenizer_name" if args.tokenizer_name else "model_name_or_path", name)


TOKENIZER_FILES_FIX = ("Pass a directory holding tokenizer files (tokenizer.json, tokenizer_config.json; "
                       "save_pretrained writes them) or the id of a hub model that has them.")


def load_tokenizer(field: str, name: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name)`; what cannot be loaded, or has no token but its special ones, is an
    `ArgumentError` naming `field`. A model folder without tokenizer files still loads for some families
    (Qwen2's tokenizer class from config.json, with no vocabulary): every text would become no tokens, the
    run would train on EOS ids alone and export that tokenizer. (A tokenizer that drops what it cannot
    encode, as a DNA tokenizer without an unknown token does, is one.)"""
    tokenizer = load_pretrained(field, name, transformers.AutoTokenizer.from_pretrained, "a tokenizer",
                                TOKENIZER_FILES_FIX)
    special = set(tokenizer.all_special_ids)
    if all(index in special for index in tokenizer.get_vocab().values()):
        fix = TOKENIZER_FILES_FIX if field != "model_name_or_path" else (
            "Save the model's tokenizer into that folder (tokenizer.save_pretrained(DIR)), or pass "
            "--tokenizer_name DIR of a folder that has it.")
        raise ArgumentError(field, f"the tokenizer loaded from {os.fspath(name)!r} ({type(tokenizer).__name__}, "
                                   f"{len(tokenizer)} tokens) has no token but its special ones, so every text "
                                   f"encodes to nothing: the folder holds no tokenizer files. {fix}")
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> transformers.PreTrainedTokenizerBase:
    """Use EOS as padding when the tokenizer has no pad token (loss masks never depend on token ids).

    `tokenizer` may also be a path or hub id (the trainers' `tokenizer=` argument), loaded here."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer("tokenizer", tokenizer)
    if not hasattr(tokenizer, "pad_token"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer or the path (or hub id) of one, got "
                        f"{type(tokenizer).__name__}; pass e.g. AutoTokenizer.from_pretrained(DIR), or DIR itself.")
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or DEFAULT_PAD_TOKEN
        logger.warning("tokenizer has no pad token; using %r. Padding is excluded from the loss by the "
                       "attention/loss masks, never by token id.", fallback)
        if tokenizer.eos_token is None:
            tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model_config(args: TrainingArguments, tokenizer: transformers.PreTrainedTokenizerBase):
    """The architecture: the pretrained model's config, or a preset/config file sized to the tokenizer. What the
    model cannot build from it is refused here, before any data is prepared, naming the argument that gave it."""
    if args.model_name_or_path:
        config = load_pretrained("model_name_or_path", args.model_name_or_path, transformers.AutoConfig.from_pretrained,
                                 "a model config", "Pass a directory holding a valid config.json (save_pretrained "
                                 "writes one) or the id of a hub model.")
        field, source = "model_name_or_path", os.fspath(args.model_name_or_path)
    else:
        config = llama_config(args.model_config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        field, source = "model_config", args.model_config
    try:
        check_buildable(config)
    except ConfigError as error:
        raise ArgumentError(field, f"the model config of {source!r} cannot be trained: {error}") from error
    if len(tokenizer) > config.vocab_size:
        raise ArgumentError("tokenizer_name", f"the tokenizer has {len(tokenizer)} tokens but the model's "
                                              f"vocab_size is {config.vocab_size}; use the model's own tokenizer.")
    if not args.model_name_or_path:  # the model is built from these ids, and its export derives its
        try:  # generation_config.json from them: held to the load's rule now, not refused by the final export
            check_config_token_ids(config, source, file_fix(source, " (the tokenizer's id is used where it sets none)"))
        except ConfigError as error:  # (a checkpoint's ids are checked by its load, generation_config.json first)
            raise ArgumentError("model_config", str(error)) from error
    check_max_length(args, config)
    return config


def check_max_length(args: TrainingArguments, config: Any) -> None:
    """The arguments the model config (built or given) cannot honour, refused before any data is prepared:
    `max_length` beyond `max_position_embeddings`, `scan_layers` with a structured mask on mixed windows."""
    check_scan_windows(args, config)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and args.max_length > limit:
        raise ArgumentError("max_length", f"{args.max_length} is longer than the model allows "
                                          f"(max_position_embeddings={limit}); use --max_length {limit} or less.")


def raw_datasets(args: TrainingArguments, dataset_train: Any, dataset_eval: Any) -> datasets.DatasetDict:
    """The raw text splits from in-memory datasets, files, a dataset name, or the embedded corpus.

    A given `dataset_eval` is the validation split whatever gives the training data (nothing is held out then,
    and it replaces a validation split the training source brings)."""
    if uses_embedded_data(args, dataset_train, dataset_eval):
        return arithmetic.make_arithmetic_splits(seed=args.seed)
    percentage = 0 if dataset_eval is not None else args.validation_split_percentage
    splits = load_text_datasets(dataset=dataset_train, dataset_name=args.dataset_name or None,
                                dataset_config_name=args.dataset_config_name, train_file=args.train_file or None,
                                validation_file=args.validation_file, validation_split_percentage=percentage,
                                seed=args.seed)
    if dataset_eval is None:
        return splits
    if "validation" in splits:
        logger.warning("dataset_eval replaces the 'validation' split of the training data source.")
    return datasets.DatasetDict(train=splits["train"], validation=_eval_split(dataset_eval))


def _eval_split(dataset_eval: Any) -> datasets.Dataset:
    """`dataset_eval` as one split: a `Dataset`, or the 'validation' (or only) split of a `DatasetDict`."""
    if isinstance(dataset_eval, datasets.DatasetDict):
        if "validation" not in dataset_eval and len(dataset_eval) != 1:
            raise DataError(f"`dataset_eval` is a DatasetDict with splits {', '.join(dataset_eval) or 'none'}; pass "
                            "one split, e.g. dataset_eval=splits['test'].")
        dataset_eval = dataset_eval["validation"] if "validation" in dataset_eval else next(iter(dataset_eval.values()))
    if not isinstance(dataset_eval, datasets.Dataset):
        raise DataError(f"`dataset_eval` must be a datasets.Dataset, got {type(dataset_eval).__name__}; build one "
                        "with datasets.Dataset.from_dict(...).")
    if len(dataset_eval) == 0:
        raise DataError("`dataset_eval` has no rows; pass a non-empty evaluation set, or none.")
    return plain_rows(dataset_eval)


def eval_metric_names(eval_step: Any, state: Any, eval_batches: Any, mesh: Any, host_only: Sequence[str]) -> set[str]:
    """The `eval_`-prefixed names `eval_step` returns, from tracing it on the first eval batch (no compute)."""
    if eval_batches is None:
        return set()
    batch_sh, hosts = sharding.batch_sharding(mesh), jax.process_count()
    fields = check_collated(next(iter(eval_batches)), host_only)
    batch = {key: jax.ShapeDtypeStruct((value.shape[0] * hosts, *value.shape[1:]), value.dtype, sharding=batch_sh)
             for key, value in fields.items()}
    return {f"eval_{name}" for name in _eval_outputs(eval_step, state, batch)}


def _eval_outputs(eval_step: Any, state: Any, batch: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
    """What `eval_step(state, batch)` returns, as shapes. A `steps.numbered` jitted step is traced as its evaluations
    call it (`batch_index` an int32), so the first of them reuses this trace instead of tracing the step again
    (0.04-0.2 s at the suite's sizes); any other step through `jax.eval_shape`."""
    jitted = getattr(eval_step, "__wrapped__", None)
    if getattr(eval_step, "takes_batch_index", False) and hasattr(jitted, "trace"):
        return jitted.trace(state, batch, np.int32(0)).out_info
    return jax.eval_shape(eval_step, state, batch)


def check_eval_metrics(args: TrainingArguments, device_names: set[str], evaluators: Sequence[Any],
                       has_eval_data: bool = True) -> None:
    """Before any compute: `eval_metrics` asks only for what this run can compute, `metric_for_best_model`
    names a metric evaluation produces (when every evaluator says what it returns), and what ranks or stops
    on evaluations has some to rank by."""
    if not has_eval_data and not evaluators:
        if args.eval_strategy != "no":
            logger.info("this run has no evaluation data: nothing is evaluated (eval_strategy=%r)", args.eval_strategy)
        for field in ("load_best_model_at_end", "early_stopping_patience"):
            if getattr(args, field):
                raise ArgumentError(field, "ranks evaluations, but this run has no evaluation data: give it a "
                                           "validation_file, a validation split (validation_split_percentage > 0) "
                                           f"or an eval dataset, or unset {field}.")
        if args.metric_for_best_model:  # warned, not refused: `evaluate(dataset)` alone ranks nothing either
            logger.warning("metric_for_best_model=%r ranks evaluations, but this run has no evaluation data, so no "
                           "checkpoint is ranked (save_total_limit keeps the newest): give it a validation_file, a "
                           "validation split (validation_split_percentage > 0) or an eval dataset, or unset "
                           "metric_for_best_model.", args.metric_for_best_model)
    declared = [getattr(evaluator, "metric_names", None) for evaluator in evaluators]
    known = None if any(names is None for names in declared) else device_names.union(*map(set, declared))
    generated = {name for names in declared for name in (names or ())}
    if args.eval_metrics and "exact_match" in args.eval_metrics and "eval_exact_match" not in generated \
            and known is not None:
        raise ArgumentError("eval_metrics", "exact_match needs held-out prompts with reference answers, which this "
                                            "run does not have (the embedded arithmetic data and SFT validation "
                                            "conversations do); drop it, or pass an evaluator.")
    metric, offered = args.metric_for_best_model, sorted(name for name in (known or set()) | {"eval_loss"}
                                                         if not name.startswith("eval_num_"))  # counts rank nothing
    if metric and known is not None and metric not in known | {"eval_loss"}:
        raise ArgumentError("metric_for_best_model", f"{metric!r} is not a metric this run's evaluation produces; "
                                                     f"choose from {', '.join(offered)}.")


def run_callbacks(args: TrainingArguments, given: Sequence[Callback]) -> list[Callback]:
    """The callbacks given, an `EarlyStopping` of the run's metric given no direction ranking it as the run does,
    then `default_callbacks`."""
    for callback in given:
        if isinstance(callback, EarlyStopping):
            callback.rank_as_run(args.metric_for_best_model or "eval_loss", args.greater_is_better)
    return [*given, *default_callbacks(args)]


def default_callbacks(args: TrainingArguments) -> list[Callback]:
    """Callbacks the arguments ask for (early stopping), then job reporting (`job.json`, stop file)."""
    callbacks: list[Callback] = []
    if args.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(metric=args.metric_for_best_model or "eval_loss",
                                       patience=args.early_stopping_patience, greater_is_better=args.greater_is_better))
    return [*callbacks, JobCallback(args)]


def check_batch_sizes(args: TrainingArguments, mesh: Any) -> None:
    """Every micro-batch and eval batch splits evenly over the data-parallel devices."""
    dp = sharding.data_parallel_size(mesh)
    micro = args.train_batch_size // args.gradient_accumulation_steps
    if micro % dp:
        raise ArgumentError("train_batch_size", f"each micro-batch has {micro} rows, which the {dp} data-parallel "
                            f"devices cannot split evenly; use a train_batch_size that is a multiple of "
                            f"{dp * args.gradient_accumulation_steps}.")
    if args.eval_batch_size % dp:
        raise ArgumentError("eval_batch_size", f"must be a multiple of the {dp} data-parallel devices.")
    check_batch_shards_per_process(mesh)


def check_batch_shards_per_process(mesh: Any) -> None:
    """Every process loads rows of its own, so no two processes may hold one shard of the batch: they would feed
    it different rows (tensor parallelism across hosts, with fewer data-parallel devices than processes)."""
    batch_axes = [mesh.axis_names.index(name) for name in sharding.BATCH_AXES if name in mesh.axis_names]
    holders: dict[tuple[int, ...], set[int]] = {}
    for position in np.ndindex(*mesh.devices.shape):
        shard = tuple(position[axis] for axis in batch_axes)
        holders.setdefault(shard, set()).add(mesh.devices[position].process_index)
    if shared := {shard: processes for shard, processes in holders.items() if len(processes) > 1}:
        shard, processes = next(iter(shared.items()))
        raise ArgumentError("tensor_parallel_size", f"processes {sorted(processes)} would each hold batch shard "
                            f"{shard} of the (data, fsdp) axes and feed it different rows. Keep tensor parallelism "
                            "within a host: data_parallel_size x fsdp_size must be a multiple of the "
                            f"{len({p for ps in holders.values() for p in ps})} processes.")


def checkpoint_manager(args: TrainingArguments) -> CheckpointManager:
    """The run's checkpoint manager: retention, async saves and best-model ranking as the arguments say. Built
    after `claim.claim_run` took the output_dir lock, so it is the one manager that cleans up temporary
    directories there (`owner`): a crashed run's, never a live one's."""
    return CheckpointManager(Path(args.output_dir) / CHECKPOINTS_DIRNAME, max_to_keep=args.save_total_limit,
                             async_save=args.async_checkpointing, best_metric=args.metric_for_best_model,
                             greater_is_better=args.greater_is_better, owner=True)


def prepared_rows(trainer: Any) -> tuple[Any, Any]:
    """`trainer.prepare_datasets()`, its rows checked (`row_sources`), data given to the trainer that it did
    not read refused by name (`given_data`), and rows each epoch leaves out warned about (not for the embedded demo
    corpus, whose rows the user did not choose), before the model is built. `disable_progress_bar` turns off the bars
    `datasets` draws while the rows are prepared."""
    token = _embedded_marks.set(embedded := [])
    try:
        with given_data.tracking() as reads, datasets_progress_bars(trainer.arguments.disable_progress_bar):
            prepared = trainer.prepare_datasets()
    finally:
        _embedded_marks.reset(token)
    given_data.check_read(trainer, bool(reads))
    train, evaluation = row_sources(prepared)
    args, rows = trainer.arguments, count_rows(train)
    epochs = rows // args.train_batch_size * args.num_train_epochs  # the steps of num_train_epochs
    if not embedded:  # the demo's corpus (620 blocks): no rows of the user's to add or drop
        warn_rows_left_out(rows, args.train_batch_size, args.max_steps if args.max_steps > 0 else epochs)
    return train, evaluation


def prepared_eval_rows(trainer: Any, dataset: Any) -> Any:
    """`trainer.prepare_eval_dataset(dataset)`, for `evaluate(dataset)`: `disable_progress_bar` turns off the bars
    `datasets` draws while that set is prepared too, as in `prepared_rows`."""
    dataset = given_data.evaluation_input(dataset)  # a Dataset as plain rows; no set of splits, no stream
    with datasets_progress_bars(trainer.arguments.disable_progress_bar):
        return trainer.prepare_eval_dataset(dataset)


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A digest of what a tokenizer does (a fast one's whole definition: vocabulary, merges, normalisation, special
    tokens; else its vocabulary and special tokens), so a resume compares tokenizers, not the paths they load from."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr((sorted(tokenizer.get_vocab().items()),
                                                               tokenizer.all_special_tokens))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
