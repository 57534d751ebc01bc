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
    "RowSource",
    "RowsCollate",
    "SFTDataOptions",
    "TokenizedExample",
    "TrainBatches",
    "TrainIterator",
    "best_fit_decreasing",
    "bucket_lengths",
    "detect_format",
    "eval_batches",
    "lm_collate",
    "lm_collate_rows",
    "load_text_datasets",
    "pack_examples",
    "packed_collate",
    "tokenize_and_group",
    "tokenize_example",
    "tokenize_sft_dataset",
]
