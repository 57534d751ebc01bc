"""Data pipeline: load text, tokenise into blocks or supervised examples, pack, and batch deterministically."""

from easytrain.data.errors import DataError
from easytrain.data.lm import Batch, lm_collate, lm_collate_rows, tokenize_and_group
from easytrain.data.loader import (
    EvalBatches,
    RowsCollate,
    RowSource,
    TrainBatches,
    TrainIterator,
    eval_batches,
)
from easytrain.data.packing import (
    Packed,
    PaddedCollate,
    best_fit_decreasing,
    bucket_lengths,
    pack_examples,
    packed_collate,
)
from easytrain.data.paired_batches import PairedCollate, pair_rows
from easytrain.data.preference_data import (
    PreferenceDataOptions,
    TokenizedPair,
    detect_preference_format,
    split_implicit_prompt,
    tokenize_pair,
    tokenize_preference_dataset,
)
from easytrain.data.sft import (
    SFTDataOptions,
    TokenizedExample,
    detect_format,
    tokenize_example,
    tokenize_sft_dataset,
)
from easytrain.data.sources import load_text_datasets

__all__ = [
    "Batch",
    "DataError",
    "EvalBatches",
    "Packed",
    "PaddedCollate",
    "PairedCollate",
    "PreferenceDataOptions",
    "TokenizedPair",
    "RowSource",
    "RowsCollate",
    "SFTDataOptions",
    "TokenizedExample",
    "TrainBatches",
    "TrainIterator",
    "best_fit_decreasing",
    "bucket_lengths",
    "detect_format",
    "detect_preference_format",
    "eval_batches",
    "lm_collate",
    "lm_collate_rows",
    "load_text_datasets",
    "pack_examples",
    "packed_collate",
    "pair_rows",
    "split_implicit_prompt",
    "tokenize_and_group",
    "tokenize_example",
    "tokenize_pair",
    "tokenize_preference_dataset",
    "tokenize_sft_dataset",
]
