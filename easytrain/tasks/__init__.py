"""Built-in tasks that train with no downloads."""

from easytrain.tasks.arithmetic import (
    build_arithmetic_tokenizer,
    make_arithmetic_dataset,
    make_arithmetic_splits,
    split_problem,
)

__all__ = [
    "build_arithmetic_tokenizer",
    "make_arithmetic_dataset",
    "make_arithmetic_splits",
    "split_problem",
]
