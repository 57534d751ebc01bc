"""Every process of a multi-process run prepares the training (and eval) rows itself and reads its share of each
global batch by row index, so all must hold the same rows: a host whose local `train_file` (or dataset version,
or data arguments) differs would mix other examples into every batch without a word, and a resume refused by
some processes only would leave the others waiting forever in the next collective.

At set-up, before any compute, the processes first agree on their arguments (`argument_agreement`, before the
data is prepared), then exchange each split's row count and content digest (`easytrain.data.digest`, which the
data position records anyway) in one small gather, and every process raises the same `ArgumentError`. A single
process compares nothing and computes no digest here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from easytrain.data.digest import rows_digest
from easytrain.errors import ArgumentError
from easytrain.trainers import argument_agreement

#: (row count, content digest or None), or None for a split this process has no rows for.
Summary = tuple[int, str | None] | None
SPLITS = ("train", "eval")
Gather = Callable[[np.ndarray], np.ndarray]
_DIGEST_BYTES = 16  # `rows_digest` is 32 hex characters
_SPLIT_BYTES = 1 + 8 + 1 + _DIGEST_BYTES  # has rows, row count, has digest, digest


def encode(summaries: Mapping[str, Summary]) -> np.ndarray:
    """The splits' summaries as one fixed-size uint8 record (bytes survive JAX's 32-bit default; int64 would not)."""
    record = np.zeros((len(SPLITS), _SPLIT_BYTES), dtype=np.uint8)
    for row, split in zip(record, SPLITS):
        if (summary := summaries.get(split)) is None:
            continue
        rows, digest = summary
        row[0] = 1
        row[1:9] = np.frombuffer(int(rows).to_bytes(8, "little"), dtype=np.uint8)
        if digest is not None:
            row[9] = 1
            row[10:] = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)
    return record.reshape(-1)


def decode(record: np.ndarray) -> dict[str, Summary]:
    """`encode`'s inverse."""
    summaries: dict[str, Summary] = {}
    for row, split in zip(np.asarray(record, dtype=np.uint8).reshape(len(SPLITS), _SPLIT_BYTES), SPLITS):
        rows = int.from_bytes(row[1:9].tobytes(), "little")
        summaries[split] = (rows, row[10:].tobytes().hex() if row[9] else None) if row[0] else None
    return summaries


def _describe(summary: Summary, split: str) -> str:
    if summary is None:
        return f"no {split} rows"
    rows, digest = summary
    return f"{rows} rows" + ("" if digest is None else f", digest {digest[:8]}")


def check_same_rows(summaries: Mapping[str, Summary], fields: Mapping[str, str], gather: Gather | None = None) -> None:
    """Refuse, in every process alike, rows that differ between processes (compared with process 0's).

    `fields`: the argument each split comes from, named in the error. `gather`: stacks every process's record in
    process order (`multihost_utils.process_allgather`)."""
    if gather is None:
        from jax.experimental import multihost_utils

        gather = multihost_utils.process_allgather
    everyone = [decode(record) for record in np.asarray(gather(encode(summaries)))]
    problems = []
    for split in SPLITS:
        reference = everyone[0][split]
        if not (others := [index for index, seen in enumerate(everyone) if seen[split] != reference]):
            continue
        shown = "; ".join(f"process {index} has {_describe(everyone[index][split], split)}" for index in others)
        who = f"process {others[0]}" if len(others) == 1 else f"processes {', '.join(map(str, others))}"
        problems.append((split, f"{who} prepared other {split} rows than process 0 ({shown}; process 0 has "
                                f"{_describe(reference, split)})"))
    if problems:
        split = problems[0][0]
        raise ArgumentError(fields[split], "; ".join(text for _, text in problems) + ". Every process reads its share "
                            "of the same rows, so they would train on mismatched batches (or wait forever for one "
                            f"another). Give every process the same {fields[split]} (the same content on every host, "
                            "e.g. on shared storage) and the same data arguments (seed, max_train_samples, "
                            "max_eval_samples, validation_split_percentage, the tokenizer), then rerun.")


def summary_of(loader: Any) -> Summary:
    """A configured loader's row count and digest: the train loader's own (`TrainBatches.num_rows`, its cached
    `data_digest`, reused by the data position), an eval set's from its rows; a loader of a trainer's own without
    them is compared by row count (`len`), or not at all."""
    if loader is None:
        return None
    if hasattr(loader, "data_digest"):
        return int(loader.num_rows), loader.data_digest
    if (source := getattr(loader, "source", None)) is not None:  # `EvalBatches`: a Dataset or columns
        rows = len(next(iter(source.values()), ())) if isinstance(source, Mapping) else len(source)
        return rows, rows_digest(source)
    return (int(loader.num_rows), None) if hasattr(loader, "num_rows") else (-1, None)


def data_fields(args: Any, given: tuple[bool, bool]) -> dict[str, str]:
    """The argument each split's rows come from, for the error to name; `given`: whether `dataset_train` and
    `dataset_eval` were passed (without any training data the embedded corpus is drawn from the `seed`)."""
    train = ("train_file" if args.train_file else "dataset_name" if args.dataset_name
             else "dataset_train" if given[0] else "seed")
    evaluation = "validation_file" if args.validation_file else "dataset_eval" if given[1] else train
    return {"train": train, "eval": evaluation}


def _process_allgather(gather: Gather | None) -> Gather:
    if gather is not None:
        return gather
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather


def check_arguments_agree(args: Any, task_arguments: Sequence[Any], process_count: int,
                          gather: Gather | None = None) -> None:
    """When the run spans several processes: the same arguments (`argument_agreement`: `args` and the trainer's
    `task_arguments`), checked before the data is prepared, whose own collectives (DPO's precomputed reference
    log-probs) would otherwise fail first, naming nothing."""
    if process_count > 1:
        argument_agreement.check_same_arguments(args, task_arguments, _process_allgather(gather))


def check_processes_agree(data: Any, args: Any, given: tuple[bool, bool], process_count: int,
                          gather: Gather | None = None) -> None:
    """When the run spans several processes: `check_same_rows` over its configured loaders (the arguments agree
    already: `check_arguments_agree`)."""
    if process_count > 1:
        check_same_rows({"train": summary_of(data.train), "eval": summary_of(data.eval)}, data_fields(args, given),
                        _process_allgather(gather))
