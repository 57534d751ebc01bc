"""`SFTTrainer`: supervised fine-tuning as a batch layout and a loss mask on top of `BaseTrainer`.

The data preparation is pure functions in `easytrain.data` (formats, masks from tokenisation,
special tokens, packing, bucketed padding); this class only chooses them from `SFTArguments` and
reports what they counted. Sharding, accumulation, checkpoints, exact resume, logging and export
are `BaseTrainer`'s, untouched; the loss is its token cross-entropy over the supervised tokens.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import jax
import numpy as np

from easytrain import argument_checks
from easytrain.arguments import TrainingArguments
from easytrain.data import (PaddedCollate, RowSource, SFTDataOptions, bucket_lengths, pack_examples, packed_collate,
                            tokenize_sft_dataset)
from easytrain.data.chat_templates import read_chat_template
from easytrain.data.errors import DataError
from easytrain.data.loader import count_rows
from easytrain.data.prompts import prompts_and_references
from easytrain.data.row_errors import rows_as_stored
from easytrain.data.sources import evaluation_examples
from easytrain.data.sft import FORMAT_COLUMNS, LANGUAGE_MODELING, detect_format, uses_chat_template
from easytrain.data.token_range import filler_id, rows_of, vocab_size_of
from easytrain.errors import ArgumentError
from easytrain.evaluators import CompletionMetrics, generation_problem
from easytrain.sinks import write_json_atomically
from easytrain.tasks import arithmetic
from easytrain.tasks.registry import register_task
from easytrain.trainers import builders, run_dir
from easytrain.trainers.base import BaseTrainer

logger = logging.getLogger("easytrain")
#: What data preparation truncated, dropped and packed, kept in output_dir (`_report_data_stats`).
DATA_STATS_FILE = "sft_data_stats.json"


@dataclass
class SFTArguments:
    """Supervised fine-tuning options (`easytrain train --task sft --help` lists them)."""

    packing: bool = field(default=False, metadata={"help": "Pack several examples into each max_length row "
                          "(segment ids and restarted positions: no attention across examples)."})
    packing_strategy: Literal["bfd", "wrapped"] = field(default="bfd", metadata={"help": "'bfd': best-fit "
                                                        "decreasing, whole examples; 'wrapped': concatenate and "
                                                        "split long documents (pretraining-style text; training "
                                                        "data only, eval examples are packed whole). Needs "
                                                        "packing."})
    completion_only_loss: bool = field(default=True, metadata={"help": "Prompt-completion data: supervise only "
                                                               "the completion (and its EOS)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "Conversations: supervise only the "
                                      "assistant turns, from the chat template's generation markers "
                                      "(see docs/sft.md)."})
    truncation_side: Literal["right", "left", "drop"] = field(default="right", metadata={
        "help": "Examples longer than max_length + 1 tokens: keep the start ('right'), the end ('left'), or drop."})
    chat_template_path: Optional[str] = field(default=None, metadata={"help": "A Jinja chat template file that "
                                              "replaces the tokenizer's own."})
    generation_eval_samples: int = field(default=0, metadata={"help": "Greedily complete this many eval prompts "
                                         "at each evaluation and report eval_exact_match (0: off; the embedded "
                                         "task uses 256)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per prompt in that evaluation."})

    def __post_init__(self) -> None:
        # Types and choices first (packing='no' would pack; a bad packing_strategy was refused after the data work).
        argument_checks.normalize(self, SFTArguments)
        argument_checks.check_types(self, SFTArguments)
        argument_checks.check_choices(self, SFTArguments)
        argument_checks.check_not_blank(self, SFTArguments)
        if self.generation_eval_samples < 0:
            raise ArgumentError("generation_eval_samples", f"must be a number of eval prompts >= 0 (0: no evaluation "
                                f"by generation), got {self.generation_eval_samples}.")
        if self.max_new_tokens < 1:
            raise ArgumentError("max_new_tokens", f"must be a number of tokens >= 1, got {self.max_new_tokens}.")


@register_task("sft", arguments=(SFTArguments,), replace=True,
               description="Supervised fine-tuning on text, prompt-completion or chat data (packing optional).")
class SFTTrainer(BaseTrainer):
    """Supervised fine-tuning. Without a dataset it trains the embedded arithmetic task as conversations.

    Args:
        arguments: the run.
        sft_arguments: the SFT options.
        formatting_func: maps a raw example to text, prompt-completion or messages form.
        compute_metrics: `(predictions, references) -> metrics` on generated completions (with
            `generation_eval_samples > 0`); kept as `answer_metrics` (the `compute_metrics` method is the
            on-device hook of `BaseTrainer`).
        **kwargs: as for `BaseTrainer` (model, tokenizer, dataset_train, dataset_eval, callbacks, evaluators).
    """

    def __init__(self, arguments: TrainingArguments | None = None, sft_arguments: SFTArguments | None = None, *,
                 formatting_func: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
                 compute_metrics: Callable[[list[str], list[str]], Mapping[str, float]] | None = None,
                 **kwargs: Any):
        if sft_arguments is not None and not isinstance(sft_arguments, SFTArguments):
            raise TypeError(f"sft_arguments must be an SFTArguments, got {type(sft_arguments).__name__}; pass "
                            "SFTArguments(...) (or None for its defaults).")
        self.sft_arguments = sft_arguments or SFTArguments()
        check_packing_read(self.sft_arguments, resuming=bool(arguments and arguments.resume_from_checkpoint))
        self.task_arguments = (self.sft_arguments,)
        self.formatting_func, self.answer_metrics = formatting_func, compute_metrics  # not the on-device hook
        self.data_stats: dict[str, dict[str, float]] = {}
        super().__init__(arguments, **kwargs)

    def check_inputs(self) -> None:
        if self.sft_arguments.chat_template_path:  # a missing file or a Jinja syntax error: before any data work
            read_chat_template(self.sft_arguments.chat_template_path)
        run_dir.check_links(Path(self.arguments.output_dir), (DATA_STATS_FILE,), movable=())  # written after the data

    def prepare_datasets(self) -> tuple[RowSource, RowSource | None]:
        args, sft = self.arguments, self.sft_arguments
        embedded = builders.uses_embedded_data(args, self._raw_train, self._raw_eval)
        if self.tokenizer is None:
            self.tokenizer = (arithmetic.build_arithmetic_chat_tokenizer() if embedded
                              else builders.build_tokenizer(args, embedded=False))
        self.tokenizer = builders.ensure_pad_token(self.tokenizer)
        if sft.chat_template_path:
            self.tokenizer.chat_template = Path(sft.chat_template_path).read_text()
        self.model_config = getattr(self._given_model, "config", None) if self._given_model is not None \
            else builders.build_model_config(args, self.tokenizer)
        builders.check_max_length(args, self.model_config)
        splits = (arithmetic.make_arithmetic_chat_splits(seed=args.seed) if embedded
                  else builders.raw_datasets(args, self._raw_train, self._raw_eval))
        warn_generation_without_prompts(sft.generation_eval_samples, "validation" in splits,
                                        self.wants_metric("exact_match"))
        limits = {"train": args.max_train_samples, "validation": args.max_eval_samples}
        rows = {name: self._rows(name, split if limits[name] is None else split.select(range(min(limits[name],
                                                                                                len(split)))))
                for name, split in splits.items() if name in limits}
        if sft.packing:  # before the loader, which would count only the rows packing made
            check_packed_rows_fill_a_batch(count_rows(rows["train"]), self.data_stats["train"], args)
        samples = min(sft.generation_eval_samples or (256 if embedded else 0), args.max_eval_samples or 1 << 30)
        if samples and "validation" in splits and self.wants_metric("exact_match"):
            validation = self._text_from_column(splits["validation"])
            if self.formatting_func is not None:  # the prompts come from the same formatted examples
                validation = validation.map(self.formatting_func, remove_columns=validation.column_names)
            with rows_of("validation"), rows_as_stored(splits["validation"]):  # rows named as stored
                prompts, references = prompts_and_references(validation, self.tokenizer, samples,
                                                             self._data_options())
            new_tokens = generation_length(prompts, sft.max_new_tokens, args.max_length, self.model_config,
                                           asked=sft.generation_eval_samples > 0)
            evaluator = CompletionMetrics(prompts, references, self.tokenizer, max_new_tokens=new_tokens,
                                          compute_metrics=self.answer_metrics)
            self.evaluators.append(evaluator)
            self._asked_generation = evaluator if sft.generation_eval_samples > 0 else None
        self._report_data_stats()
        return rows["train"], rows.get("validation")

    #: The generation evaluator `generation_eval_samples > 0` asked for: refused, not left out, where it cannot run.
    _asked_generation: CompletionMetrics | None = None

    def _settle_evaluators(self, module: Any) -> None:
        """As `BaseTrainer`'s, but the evaluation `generation_eval_samples` asked for is refused by that name on a
        module that cannot generate (the embedded task's own, unasked, is left out with a warning)."""
        samples, asked = self.sft_arguments.generation_eval_samples, self._asked_generation
        if asked is not None and any(e is asked for e in self.evaluators) and (problem := generation_problem(module)):
            raise ArgumentError("generation_eval_samples", f"{samples} asks for exact_match on greedy completions, "
                                f"and {problem}; pass --generation_eval_samples 0, or give the module init_cache() "
                                "and decode() (as easytrain.models.LlamaForCausalLM has).")
        super()._settle_evaluators(module)

    def prepare_eval_dataset(self, dataset: Any) -> RowSource:
        """Another eval set's examples (a `datasets.Dataset`), tokenised (and packed) as the configured one's."""
        return self._rows("evaluate", evaluation_examples(dataset))

    def _rows(self, name: str, split: Any) -> RowSource:
        """Tokenised (and packed) rows of one split; what was counted goes to `data_stats`."""
        args, sft, split_name = self.arguments, self.sft_arguments, None if name == "evaluate" else name
        if name == "train" and sft.chat_template_path and self.formatting_func is None:
            check_template_read(self._text_from_column(split), sft.chat_template_path)
        with rows_of(split_name):
            tokenized, stats = tokenize_sft_dataset(self._text_from_column(split), self.tokenizer, self._data_options(),
                                                    formatting_func=self.formatting_func,
                                                    num_proc=args.preprocessing_num_workers,
                                                    vocab_size=vocab_size_of(self.model_config))
        self.data_stats[name] = dict(stats)
        if not sft.packing:
            # one shape per process set; a pad past the model's vocabulary (added since) pads with an id it has
            buckets = bucket_lengths(args.max_length) if jax.process_count() == 1 else (args.max_length,)
            self._pad = PaddedCollate(buckets, filler_id(self.tokenizer.pad_token_id, self.model_config))
            return tokenized
        strategy = sft.packing_strategy if name == "train" else "bfd"  # eval examples whole: same eval_loss
        with rows_of(split_name):
            packed = pack_examples(tokenized, args.max_length, strategy=strategy, seed=args.seed)
        self.data_stats[name].update({f"packing_{key}": value for key, value in packed.stats.items()})
        return packed.rows

    def _text_from_column(self, split: Any) -> Any:
        """`split` with its `text_column` as the plain-text `text` column (any other `text` dropped), so the
        examples, and the data digest a resume compares, are that column's."""
        return text_from_column(split, self.arguments.text_column, self.formatting_func is not None)

    def _data_options(self) -> SFTDataOptions:
        """How every split, and the generation prompts, are tokenised."""
        args, sft = self.arguments, self.sft_arguments
        return SFTDataOptions(max_length=args.max_length + 1, truncation_side=sft.truncation_side,
                              assistant_only_loss=sft.assistant_only_loss,
                              completion_only_loss=sft.completion_only_loss,
                              text_column=args.text_column)

    def collate(self, rows: Mapping[str, np.ndarray], example_ids: np.ndarray) -> dict[str, np.ndarray]:
        return packed_collate(rows, example_ids) if self.sft_arguments.packing else self._pad(rows, example_ids)

    def longest_batch_length(self) -> int | None:
        """Padded rows: the largest bucket (the memory plan's shape); packed rows have one shape."""
        return None if self.sft_arguments.packing else self._pad.buckets[-1]

    def count_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Real (non-padding) tokens, so `tokens_per_second` is comparable between packing and padding."""
        return int(np.sum(batch["attention_mask"]))

    def _report_data_stats(self) -> None:
        """Log what preparation truncated, dropped and packed (kept in output_dir once it is claimed:
        `save_claimed_outputs`)."""
        for name, stats in self.data_stats.items():
            logger.info("SFT %s data: %s", name, stats_line(stats))
            if stats.get("truncated") or stats.get("dropped_too_long") or stats.get("dropped_no_supervised_tokens"):
                logger.warning("SFT %s data: %d example(s) truncated, %d dropped as too long, %d dropped with no "
                               "supervised token left", name, stats.get("truncated", 0),
                               stats.get("dropped_too_long", 0), stats.get("dropped_no_supervised_tokens", 0))

    claimed_outputs = (DATA_STATS_FILE,)  # held by the claim with the older run's files

    def save_claimed_outputs(self) -> None:
        """`sft_data_stats.json`, once the run has claimed output_dir (process 0): written at set-up, it would replace
        the stats of a run there that this one may yet leave as it was (refused at the claim, or ending before its
        first step: the claim holds the older file)."""
        if self.is_main_process:
            write_json_atomically(Path(self.arguments.output_dir) / DATA_STATS_FILE, self.data_stats)

    def task_settings(self) -> dict[str, Any]:
        """The SFT options that decide the rows: a resume under different packing, masking or truncation is
        refused like any data-order change (`check_resumable` compares `run_info()['task_arguments']`)."""
        return {name: getattr(self.sft_arguments, name) for name in (
            "packing", "packing_strategy", "completion_only_loss", "assistant_only_loss", "truncation_side",
            "chat_template_path")}


def check_template_read(split: Any, path: str) -> bool:
    """Whether the training rows render through the chat template. Rows that never do (plain text, prompt-completion
    strings) train exactly as without `chat_template_path`: warned about, not refused, since the template still
    goes with the exported tokenizer (text rendered with it beforehand is a reason to give it)."""
    data_format = detect_format(split.column_names)
    if uses_chat_template(data_format, split):
        return True
    logger.warning("chat_template_path=%r: the training rows are %s strings, which no chat template renders, so it "
                   "changes no training token; it is only saved with the exported tokenizer. Convert the rows to "
                   "messages for the template to shape them.", path, data_format)
    return False


def check_packing_read(sft: SFTArguments, resuming: bool = False) -> None:
    """packing_strategy is read only when packing: given alone it trained padded rows without a word. Refused for a
    fresh run; a resume is left to the comparison of its task_arguments with the checkpoint's, since a run saved before
    this refusal recorded it so and reruns from its arguments.json."""
    if sft.packing_strategy != "bfd" and not sft.packing and not resuming:
        raise ArgumentError("packing_strategy", f"{sft.packing_strategy!r} is read only with packing=True; pass "
                                                "--packing too, or drop packing_strategy.")


def warn_generation_without_prompts(samples: int, has_eval_data: bool, wanted: bool) -> bool:
    """Whether `generation_eval_samples > 0` asks for exact_match on held-out prompts a run without evaluation data
    lacks: warned about (it was silent), not refused, since such a trainer may only `evaluate(dataset)` a set given
    later, which generates nothing anyway, or rerun a run saved before (its arguments.json holds it)."""
    if samples > 0 and wanted and not has_eval_data:
        logger.warning("generation_eval_samples=%d asks for exact_match on held-out prompts, but this run has no "
                       "evaluation data, so none is computed: give it a validation_file, a validation split "
                       "(validation_split_percentage > 0) or an eval dataset, or pass --generation_eval_samples 0.",
                       samples)
        return True
    return False


def text_from_column(split: Any, text_column: str, formatted: bool) -> Any:
    """The plain-text rows of `split`'s `text_column`, renamed `text`; `split` itself for the default column.

    Raises:
        ArgumentError: a non-default `text_column` with a `formatting_func` (`formatted`), over conversations or
            prompt-completion rows (they are not plain text), or naming no column of `split`.
    """
    if text_column == "text":
        return split
    if formatted:
        raise ArgumentError("text_column", f"{text_column!r} is not read when a formatting_func builds each "
                            "example; read that column in the formatting_func and leave text_column at 'text'.")
    names = split.column_names
    for data_format, required in FORMAT_COLUMNS.items():
        if data_format != LANGUAGE_MODELING and set(required) <= set(names):
            raise ArgumentError("text_column", f"{text_column!r} selects plain text, but these rows are "
                                f"{data_format} data (columns {', '.join(map(repr, required))}), whose text "
                                "the format decides. Leave text_column at 'text', or drop those columns to train on "
                                f"{text_column!r} as plain text.")
    if text_column not in names:
        raise ArgumentError("text_column", f"{text_column!r} is not a column of the data (columns: "
                            f"{', '.join(map(repr, sorted(names))) or 'none'}); set text_column to the one holding "
                            "the plain text.")
    return split.select_columns([text_column]).rename_column(text_column, "text")


def generation_length(prompts: list[list[int]], max_new_tokens: int, max_length: int, config: Any, *,
                      asked: bool = True) -> int:
    """The tokens to generate per prompt: `max_new_tokens`, when the longest prompt and they fit the config's
    `max_position_embeddings`. Generating N tokens after P feeds the model P + N - 1 positions, and those past the
    limit were never trained (RoPE extrapolates them silently), so, as `builders.check_max_length` refuses
    `max_length` past it, an evaluation the user `asked` for (`generation_eval_samples`) is refused; the embedded
    task's own (unasked, answers of a few tokens) generates what fits, with a warning.

    Raises:
        ArgumentError: naming `max_new_tokens`, with the largest that fits and the bound that fits any prompt.
    """
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(map(len, prompts), default=0)
    if not isinstance(limit, numbers.Integral) or not longest or longest + max_new_tokens - 1 <= limit:
        return max_new_tokens
    room = int(limit) - longest + 1  # >= 1: prompts are at most max_length <= max_position_embeddings tokens
    if not asked:
        logger.warning("The embedded task's evaluation by generation generates %d tokens per prompt: max_new_tokens "
                       "%d would run past max_position_embeddings=%d after its longest prompt (%d tokens).", room,
                       max_new_tokens, limit, longest)
        return room
    raise ArgumentError("max_new_tokens", f"evaluation by generation would run past the model's positions "
                        f"(max_position_embeddings={limit}): the longest eval prompt has {longest} tokens, and with "
                        f"max_new_tokens {max_new_tokens} the model reads {longest + max_new_tokens - 1} positions, "
                        f"the last ones never trained. Use max_new_tokens {room} or less (any prompt fits with "
                        f"max_new_tokens <= max_position_embeddings - max_length + 1 = {max(limit - max_length + 1, 0)}"
                        "), lower max_length (prompts are cut as training cuts examples), or set "
                        "generation_eval_samples 0.")


def check_packed_rows_fill_a_batch(num_rows: int, stats: Mapping[str, Any], args: TrainingArguments) -> None:
    """Packing can make fewer rows of `max_length` tokens than one global batch from many short examples; say so
    in terms of the examples given (`stats`: the training split's `data_stats`), with the ways to get more rows.

    Raises:
        DataError: `num_rows` is less than `train_batch_size`.
    """
    batch = args.train_batch_size
    if num_rows >= batch:
        return
    tokens = int(stats["packing_num_tokens"])
    samples = ", raise or unset `max_train_samples`" if args.max_train_samples is not None else ""
    raise DataError(
        f"Packing put the {stats['packing_num_examples']} training examples ({tokens} tokens in all) into {num_rows} "
        f"row{'' if num_rows == 1 else 's'} of max_length {args.max_length} tokens, but one global batch needs "
        f"{batch} rows (`train_batch_size`). Lower `max_length` (these tokens fill {batch} rows of about "
        f"{max(1, tokens // batch)} tokens), set `packing` off (one row per example), lower `train_batch_size`"
        f"{samples}, or add data.")


def stats_line(stats: Mapping[str, Any]) -> str:
    """`key=value, ...`: counts exactly (`num_examples=123456`, not `1.235e+05`), rates to 4 digits."""
    return ", ".join(f"{key}={value}" if isinstance(value, numbers.Integral) else f"{key}={value:.4g}"
                     for key, value in stats.items())
