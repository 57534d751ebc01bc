"""Turn whatever the user points at into a ``DatasetDict`` with train/validation.

Sources are an in-memory ``Dataset``/``DatasetDict``, a dataset name or local
directory understood by ``datasets.load_dataset``, or local data files. Every
path ends in the same shape so the rest of the pipeline has one case to handle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import TypeAlias

import datasets
from datasets.exceptions import DatasetGenerationError

from easytrain.data.csv_files import csv_text_features
from easytrain.data.errors import DataError, error_reason

TRAIN = "train"
VALIDATION = "validation"

#: File extension -> ``datasets`` builder that reads it.
FILE_BUILDERS: Mapping[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}

#: Builder options for a text corpus: CSV cells read literally (pandas turns "NA", "null", "None", "n/a" into
#: missing values, dropped as empty documents; every column is also read as text, `csv_files.csv_text_features`) and a
#: UTF-8 byte order mark not kept as text.
BUILDER_OPTIONS: Mapping[str, Mapping[str, object]] = {
    "csv": {"keep_default_na": False, "na_filter": False},
    "text": {"encoding": "utf-8-sig"},
}

PathLike: TypeAlias = str | os.PathLike[str]

logger = logging.getLogger("easytrain")

#: How `evaluate`'s argument is named in errors.
EVALUATE = "evaluate(dataset)"

#: The folder of the `datasets` cache (or of `cache_dir`) that holds local files' Arrow copies, one sub-folder per
#: state of the files (`local_files_cache`).
LOCAL_FILES_CACHE = "easytrain_local_files"
#: A marker in that folder: the .csv files of this signature passed the row check (`csv_files.csv_text_features`).
CSV_ROWS_CHECKED = "csv_rows_checked"


def load_text_datasets(
    *,
    dataset: datasets.Dataset | datasets.DatasetDict | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: PathLike | None = None,
    validation_file: PathLike | None = None,
    validation_split_percentage: int = 5,
    seed: int = 0,
    cache_dir: PathLike | None = None,
) -> datasets.DatasetDict:
    """Load a training corpus and make sure it has a validation split.

    Exactly one source must be given: ``dataset``, ``dataset_name`` or
    ``train_file`` (optionally with ``validation_file``).

    Args:
        dataset: An in-memory ``Dataset`` (used as the train split) or a
            ``DatasetDict`` with a ``"train"`` split.
        dataset_name: A dataset name or local directory for
            ``datasets.load_dataset``, or a ``save_to_disk`` directory.
        dataset_config_name: The configuration of ``dataset_name``, if any.
        train_file: A local ``.json``/``.jsonl``/``.csv``/``.parquet``/
            ``.txt``/``.text`` file with the training data (see ``BUILDER_OPTIONS``).
        validation_file: A local file of the same format with validation data.
        validation_split_percentage: Percentage of train rows to hold out when
            the source has no validation split; 0 keeps everything for training.
        seed: Seed of the held-out split, so reruns hold out the same rows.
        cache_dir: Where ``datasets`` caches downloads and Arrow files.

    Returns:
        A ``DatasetDict`` with a non-empty ``"train"`` split and, when the
        source has one or one was split off, a non-empty ``"validation"`` split.

    Raises:
        DataError: No source or several sources, missing or unsupported files,
            a bad ``validation_split_percentage``, or an empty split.
    """
    _check_one_source(dataset, dataset_name, train_file, validation_file)
    _check_percentage(validation_split_percentage)
    cache = None if cache_dir is None else os.fspath(cache_dir)
    if dataset is not None:
        splits = _from_memory(dataset)
    elif dataset_name is not None:
        splits = _from_name(dataset_name, dataset_config_name, cache)
    else:
        assert train_file is not None  # guaranteed by _check_one_source
        splits = _from_files(train_file, validation_file, cache)
    splits = _keep_train_and_validation(splits)
    _check_not_empty(splits)
    if VALIDATION not in splits and validation_split_percentage > 0:
        splits = _split_off_validation(splits[TRAIN], validation_split_percentage, seed)
    return splits


def _check_one_source(
    dataset: object, dataset_name: str | None, train_file: object, validation_file: object
) -> None:
    """Reject zero or several sources: guessing which one was meant hides mistakes."""
    given = [
        name
        for name, value in (
            ("dataset", dataset),
            ("dataset_name", dataset_name),
            ("train_file", train_file),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise DataError(
            f"Got several data sources ({', '.join(given)}); pass exactly one of "
            "`dataset`, `dataset_name` or `train_file`."
        )
    if validation_file is not None and train_file is None:
        raise DataError(
            "`validation_file` was given without `train_file`; pass `train_file` too, "
            "or drop `validation_file` and let a validation split be held out."
        )
    if not given:
        raise DataError(
            "No data source given; pass `dataset` (an in-memory Dataset), "
            "`dataset_name` (a dataset name or local directory) or `train_file` "
            "(a local .json/.jsonl/.csv/.parquet/.txt file)."
        )


def _check_percentage(validation_split_percentage: int) -> None:
    if not 0 <= validation_split_percentage < 100:
        raise DataError(
            f"`validation_split_percentage` must be in [0, 100), got "
            f"{validation_split_percentage}; use e.g. 5, or 0 to hold nothing out."
        )


def _from_memory(dataset: datasets.Dataset | datasets.DatasetDict) -> datasets.DatasetDict:
    """The given splits, read as plain rows (`plain_rows`); anything else is refused naming the trainer's
    `dataset_train` too, through which most in-memory data comes."""
    if isinstance(dataset, datasets.Dataset):
        return datasets.DatasetDict({TRAIN: plain_rows(dataset)})
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({name: plain_rows(split) for name, split in dataset.items()})
    _refuse_stream(dataset, "`dataset` (the training data: `dataset_train` of a trainer)")
    raise DataError(
        f"`dataset` must be a datasets.Dataset or datasets.DatasetDict, got {type(dataset).__name__} (the "
        f"training data: `dataset_train` of a trainer); {_how_to_build(dataset)}."
    )


def evaluation_examples(dataset: object) -> datasets.Dataset:
    """The raw examples given to `evaluate(dataset)`, for a built-in `prepare_eval_dataset`: one
    `datasets.Dataset`, read as plain rows. A set of splits, a stream or other rows are refused naming the fix."""
    _refuse_stream(dataset, f"`{EVALUATE}`")
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(
            f"`{EVALUATE}` takes one split, got a DatasetDict with splits {list(dataset)}; pass one, e.g. "
            f"evaluate(splits[{next(iter(dataset), 'validation')!r}])."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"`{EVALUATE}` takes a datasets.Dataset, got {type(dataset).__name__}; "
                        f"{_how_to_build(dataset)}.")
    return plain_rows(dataset)


def plain_rows(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` read as plain Python values: with a numpy, pandas or arrow format set, the data code would be
    handed arrays and tables where it reads lists and strings."""
    return dataset if dataset.format["type"] is None else dataset.with_format(None)


def _refuse_stream(dataset: object, argument: str) -> None:
    if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(
            f"{argument} is streamed ({type(dataset).__name__}), which is not accepted: training and evaluation "
            "read rows by index. Load it without `streaming=True`, or collect its rows with "
            "datasets.Dataset.from_list(list(rows))."
        )


def _how_to_build(rows: object) -> str:
    """How to make a `datasets.Dataset` of `rows`."""
    if isinstance(rows, (list, tuple)):
        return "build one with datasets.Dataset.from_list(rows)"
    if isinstance(rows, Mapping):
        return "build one with datasets.Dataset.from_dict(columns)"
    if type(rows).__name__ == "DataFrame":
        return "build one with datasets.Dataset.from_pandas(frame)"
    return "build one with datasets.Dataset.from_list(rows) or datasets.Dataset.from_dict(columns)"


def _from_name(name: str, config: str | None, cache_dir: str | None) -> datasets.DatasetDict:
    if _saved_to_disk(name):
        return _from_disk(name, config)
    if os.path.isdir(name):  # a folder of data files, cached as they are now; a Hub name keeps the shared cache
        cache_dir = local_files_cache(_folder_files(name), cache_dir)
    try:
        loaded = datasets.load_dataset(name, config, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, DatasetGenerationError) as error:  # unreachable, unknown, unreadable
        offline = " (HF_DATASETS_OFFLINE=1 is set: only datasets already in the cache load)" if _offline() else ""
        reason = error_reason(error, innermost=isinstance(error, DatasetGenerationError))
        raise DataError(
            f"`dataset_name` {name!r} could not be loaded{offline}: {reason}. Pass a local "
            "dataset directory, the name of a dataset on the Hugging Face Hub, or `train_file`."
        ) from error
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(
            f"`dataset_name={name!r}` did not load as a set of splits "
            f"(got {type(loaded).__name__}); point it at a map-style dataset."
        )
    return loaded


def _saved_to_disk(name: str) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    markers = (datasets.config.DATASET_STATE_JSON_FILENAME, datasets.config.DATASETDICT_JSON_FILENAME)
    return any(os.path.isfile(os.path.join(name, marker)) for marker in markers)


def _from_disk(name: str, config: str | None) -> datasets.DatasetDict:
    """``datasets.load_from_disk``, which ``load_dataset`` refuses to stand in for; a ``Dataset`` is the train split."""
    if config is not None:
        raise DataError(
            f"`dataset_name` {name!r} is a save_to_disk directory, which has no configurations; "
            f"drop `dataset_config_name` ({config!r})."
        )
    try:
        loaded = datasets.load_from_disk(name)
    except (FileNotFoundError, ValueError) as error:  # a damaged directory
        raise DataError(
            f"`dataset_name` {name!r} looks like a save_to_disk directory but could not be loaded "
            f"({error_reason(error)}); save it again with save_to_disk."
        ) from error
    return _from_memory(loaded)


def _from_files(
    train_file: PathLike, validation_file: PathLike | None, cache_dir: str | None
) -> datasets.DatasetDict:
    data_files = {TRAIN: os.fspath(train_file)}
    if validation_file is not None:
        data_files[VALIDATION] = os.fspath(validation_file)
    builders = {split: _builder_for(path, f"{split}_file") for split, path in data_files.items()}
    if len(set(builders.values())) > 1:
        raise DataError(
            f"`train_file` and `validation_file` have different formats "
            f"({builders[TRAIN]} vs {builders[VALIDATION]}); convert them to one format."
        )
    for split, path in data_files.items():
        if os.path.getsize(path) == 0:
            raise DataError(f"`{split}_file` {path!r} is empty; point it at a file with data.")
    options = dict(BUILDER_OPTIONS.get(builders[TRAIN], {}))
    files_cache = local_files_cache(data_files.values(), cache_dir)
    if builders[TRAIN] == "csv":
        options["features"] = csv_text_features(data_files, TRAIN, os.path.join(files_cache, CSV_ROWS_CHECKED))
    try:
        return datasets.load_dataset(builders[TRAIN], data_files=data_files, cache_dir=files_cache, **options)
    except DatasetGenerationError as error:  # a parse error (broken JSON, CSV) or no rows to infer a schema from
        files = " or ".join(f"`{split}_file` {path!r}" for split, path in data_files.items())
        raise DataError(
            f"{files} could not be read as {builders[TRAIN]} ({error_reason(error)}); fix the file, e.g. one JSON "
            "object per line for .jsonl, a header row for .csv."
        ) from error


def local_files_cache(paths: Iterable[str], cache_dir: str | None) -> str:
    """The cache folder of local `paths` as they are now: `datasets` keys a local file's cache on its path and
    modification time only, so a file replaced keeping its old mtime (cp -p, rsync -t, tar, a build tool that fixes
    mtimes) would be read as its old rows. The folder is named by each file's size, inode and change time too (the
    change time cannot be set back by utime), so an unchanged file is read from its cache, a changed one parsed anew."""
    signature = []
    for path in sorted({os.path.abspath(path) for path in paths}):
        try:
            stat = os.stat(path)
        except OSError:  # gone since it was listed: `datasets` names it
            continue
        signature.append([path, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns])
    digest = hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:20]
    return os.path.join(cache_dir if cache_dir is not None else datasets.config.HF_DATASETS_CACHE,
                        LOCAL_FILES_CACHE, digest)


def _folder_files(folder: str) -> list[str]:
    """The files `datasets` may read from a dataset folder: all but hidden ones (a changed file it does not read
    only costs one parse)."""
    files = []
    for root, directories, names in os.walk(folder):
        directories[:] = [name for name in directories if not name.startswith(".")]
        files += [os.path.join(root, name) for name in names if not name.startswith(".")]
    return files


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _builder_for(path: str, argument: str) -> str:
    """Pick the ``datasets`` builder from the file extension, checking the file exists."""
    if os.path.isdir(path):
        raise DataError(
            f"`{argument}` {path!r} is a directory, not a file; pass a file, or pass the directory as "
            "`dataset_name` (a dataset directory, or a folder of data files)."
        )
    if not os.path.isfile(path):
        raise DataError(f"`{argument}` {path!r} does not exist; check the path.")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_BUILDERS:
        raise DataError(
            f"`{argument}` {path!r} has unsupported extension {extension!r}; "
            f"use one of {', '.join(FILE_BUILDERS)}."
        )
    return FILE_BUILDERS[extension]


def _keep_train_and_validation(splits: datasets.DatasetDict) -> datasets.DatasetDict:
    if TRAIN not in splits:
        raise DataError(
            f"The data source has no {TRAIN!r} split (it has {', '.join(splits) or 'none'}); "
            f"rename the training split to {TRAIN!r}."
        )
    kept = {name: splits[name] for name in (TRAIN, VALIDATION) if name in splits}
    unused = [name for name in splits if name not in kept]
    if unused:  # a 'test' split evaluating nothing, silently, would surprise; which rows evaluate stays as it was
        named = ", ".join(map(repr, unused))
        logger.warning(
            "The data source's split%s %s %s not used: only %r and %r are read, and evaluation uses the %r split, "
            "`dataset_eval`, or the `validation_split_percentage` of %r rows held out. To evaluate on %r, rename "
            "it %r in the source (e.g. `splits[%r] = splits.pop(%r)`, then `save_to_disk`), or pass it to the "
            "trainer as `dataset_eval` (`dataset_eval=splits[%r]`).", "s" if len(unused) > 1 else "", named,
            "are" if len(unused) > 1 else "is", TRAIN, VALIDATION, VALIDATION, TRAIN, unused[0], VALIDATION,
            VALIDATION, unused[0], unused[0])
    return datasets.DatasetDict(kept)


def _check_not_empty(splits: datasets.DatasetDict) -> None:
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(f"The {name!r} split has no rows; point the source at non-empty data.")


def _split_off_validation(
    train: datasets.Dataset, percentage: int, seed: int
) -> datasets.DatasetDict:
    """Hold out ``percentage`` of the rows (at least one), seeded for reproducibility.

    Both splits are selections of the loaded rows (an indices mapping, not a copy), through which a bad example
    is named by its row in the loaded data (``row_errors.rows_as_stored``), not by its place in the split."""
    num_validation = max(1, math.ceil(len(train) * percentage / 100))
    if num_validation >= len(train):
        raise DataError(
            f"The 'train' split has {len(train)} rows, too few to hold out "
            f"{percentage}% for validation; add data, pass `validation_file`, or set "
            "`validation_split_percentage=0`."
        )
    parts = train.train_test_split(test_size=num_validation, seed=seed, shuffle=True)
    return datasets.DatasetDict({TRAIN: parts["train"], VALIDATION: parts["test"]})
