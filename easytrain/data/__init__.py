"""Data pipeline: load text, tokenise into blocks, and batch deterministically."""

from easytrain.data.errors import DataError
from easytrain.data.lm import Batch, lm_collate, lm_collate_rows, tokenize_and_group
from easytrain.data.loader import (
    RowsCollate,
    RowSource,
    TrainBatches,
    TrainIterator,
    eval_batches,
)
from easytrain.data.sources import load_text_datasets

__all__ = [
    "Batch",
    "DataError",
    "RowSource",
    "RowsCollate",
    "TrainBatches",
    "TrainIterator",
    "eval_batches",
    "lm_collate",
    "lm_collate_rows",
    "load_text_datasets",
    "tokenize_and_group",
]
