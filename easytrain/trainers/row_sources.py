"""What `prepare_datasets` returned, checked before any batching: a pair of row sources, each one set of rows."""

from __future__ import annotations

from typing import Any, Mapping

import datasets


def row_sources(prepared: Any) -> tuple[Any, Any]:
    """`prepare_datasets`' pair, before any batching: not the train rows alone (a dict would unpack into its column
    names), nor several splits in one (a `DatasetDict`), nor several eval sets in a dict (a dict of columns is one)."""
    if not isinstance(prepared, (tuple, list)) or len(prepared) != 2:
        what = "None" if prepared is None else f"a {type(prepared).__name__}" + (
            f" of {len(prepared)}" if isinstance(prepared, (tuple, list)) else "")
        raise TypeError(f"prepare_datasets returned {what}; return (train_rows, eval_rows), eval_rows None for no "
                        "evaluation set.")
    train, evaluation = prepared
    for name, rows in (("train", train), ("eval", evaluation)):
        if isinstance(rows, datasets.DatasetDict):
            raise TypeError(f"prepare_datasets returned a DatasetDict with splits {list(rows)} as its {name} rows; "
                            "return (train, eval), e.g. (splits['train'], splits['test']), or (train, None).")
        if isinstance(rows, Mapping) and rows and all(isinstance(value, (Mapping, datasets.Dataset))
                                                      for value in rows.values()):
            fix = ("return one eval set, e.g. (train, sets['a']), and evaluate each of the others with "
                   "trainer.evaluate(dataset) (prepare_eval_dataset makes rows of it)") if name == "eval" else \
                "return one training set (its rows: columns of equal length, or a datasets.Dataset)"
            raise TypeError(f"prepare_datasets returned a dict of several {name} sets {tuple(rows)} as its {name} "
                            f"rows; {fix}.")
    return train, evaluation
