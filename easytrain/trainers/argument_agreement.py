"""Every process of a multi-process run builds the run from its own arguments, and nothing else makes them agree:
a process given another `train_batch_size` assembles a global batch the size of neither, one given another
`learning_rate` or `seed` updates (or initialises) its parameter shards its own way, all without a word, and one
given another `lora_rank` dies in the first collective of other sizes (a raw Gloo abort, job.json left queued).

The processes exchange a digest of their compared arguments (every `TrainingArguments` field and every field of
the trainer's `task_arguments`, less `PER_HOST_FIELDS`): when their trainers are built, in the first gather of the
start (`telling_differences`), so that every process names the differing fields (whatever check of those arguments
one of them failed first: kept as the refusal's cause) before any further collective; and at set-up, before the
data is prepared, in one small gather of its own (`check_same_arguments`: a task's arguments may be set after its
trainer is built, as `easytrain train --task` does). Only when the digests differ do they exchange the values
themselves (a second gather, as JSON), so that every process raises the same `ArgumentError` naming each differing
field with every process's value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from easytrain.errors import ArgumentError

Gather = Callable[[np.ndarray], np.ndarray]

#: Fields that may differ between processes, and why. Everything else must be equal.
PER_HOST_FIELDS: dict[str, str] = {
    "process_id": "each process's own index",
    "coordinator_address": "how each host reaches process 0 (e.g. localhost there); the join itself fails if wrong",
    "num_processes": "the join (`jax.distributed`) already requires every process to count the same",
    "output_dir": "a host's mount point may differ; when all write there (checkpoints, resume) the run checks "
                  "that every process sees the same storage (`shared_output_dir`), otherwise each keeps its logs",
    "train_file": "a host's local copy may lie elsewhere; the rows' content is compared (`data_agreement`)",
    "validation_file": "as train_file",
    "dataset_name": "as train_file (a local directory may lie elsewhere on each host)",
    "compilation_cache_dir": "a host-local cache of compiled programs; changes no result",
    "preprocessing_num_workers": "the host's CPU count; the rows it prepares are compared (`data_agreement`)",
    "disable_progress_bar": "the host's terminal only",
}
_DIGEST_BYTES = 16
SUMMARY_BYTES = _DIGEST_BYTES + 8  # the values' digest, the length of their JSON
_SHOWN_CHARS = 80  # a value longer than this is shortened in the error


def compared_values(args: Any, task_arguments: Sequence[Any] = ()) -> dict[str, Any]:
    """The values every process must share, as JSON-ready values: `TrainingArguments` fields by name, a task
    argument dataclass's as `ClassName.field`."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(args)
              if field.name not in PER_HOST_FIELDS}
    for task in task_arguments:
        values.update({f"{type(task).__name__}.{field.name}": getattr(task, field.name)
                       for field in dataclasses.fields(task)})
    return json.loads(_json(values))


def _json(values: Mapping[str, Any]) -> str:
    try:
        return json.dumps(values, sort_keys=True, default=_stable_repr, allow_nan=True)
    except TypeError:  # a dict whose keys do not sort (ints and strings) or that JSON cannot hold (tuples)
        return json.dumps(_string_keys(values), sort_keys=True, default=_stable_repr, allow_nan=True)


def _string_keys(value: Any) -> Any:
    """`value` with every dict's keys as JSON spells them (`1` -> "1"), or by their stable repr."""
    if isinstance(value, Mapping):
        return {key if isinstance(key, str) else json.dumps(key) if isinstance(key, (int, float, bool, type(None)))
                else _stable_repr(key): _string_keys(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_string_keys(item) for item in value]
    return value


def _stable_repr(value: Any) -> str:
    """A value JSON cannot hold, by its repr; by its type alone where the repr holds a memory address (an object
    in a task's arguments), which differs per process; a set by its elements' sorted reprs (its own order depends
    on each process's hash seed)."""
    if isinstance(value, (set, frozenset)):
        elements = ", ".join(sorted(_stable_repr(element) for element in value))
        if not value or type(value) is not set:
            return f"{type(value).__qualname__}({{{elements}}})" if value else f"{type(value).__qualname__}()"
        return f"{{{elements}}}"
    text = repr(value)
    return f"<{type(value).__qualname__}>" if " at 0x" in text and not isinstance(value, str) else text


def summary_record(values: Mapping[str, Any]) -> np.ndarray:
    """The values' digest and JSON length as a fixed-size uint8 record (bytes survive JAX's 32-bit default)."""
    text = _json(values).encode()
    digest = hashlib.sha256(text).digest()[:_DIGEST_BYTES]
    return np.frombuffer(digest + len(text).to_bytes(8, "little"), dtype=np.uint8).copy()


def values_record(values: Mapping[str, Any], size: int) -> np.ndarray:
    """The values' JSON, zero-padded to `size` bytes (the longest of all processes')."""
    text = _json(values).encode()
    record = np.zeros(size, dtype=np.uint8)
    record[:len(text)] = np.frombuffer(text, dtype=np.uint8)
    return record


def values_of(record: np.ndarray) -> dict[str, Any]:
    """`values_record`'s inverse."""
    return json.loads(np.asarray(record, dtype=np.uint8).tobytes().rstrip(b"\0").decode())


_MISSING = "(not given)"


def differences(everyone: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, Any]]:
    """Each field whose value differs from process 0's somewhere: process 0's value and each differing one's, by
    process index. A field one process lacks (another task's arguments) shows as `_MISSING`."""
    names = list(dict.fromkeys(name for values in everyone for name in values))
    found = {}
    for name in names:
        seen = {index: values.get(name, _MISSING) for index, values in enumerate(everyone)}
        if differing := {index: value for index, value in seen.items() if index and value != seen[0]}:
            found[name] = {0: seen[0], **differing}
    return found


def _shown(value: Any) -> str:
    text = value if value is _MISSING else json.dumps(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


def check_same_arguments(args: Any, task_arguments: Sequence[Any], gather: Gather) -> None:
    """Refuse, in every process alike, arguments that differ between processes (compared with process 0's).

    `gather` stacks every process's record in process order (`multihost_utils.process_allgather`); it is called
    once, or twice where the arguments differ (every process sees that alike, so all call it as often)."""
    values = compared_values(args, task_arguments)
    summaries = np.asarray(gather(summary_record(values))).reshape(-1, SUMMARY_BYTES)
    _refuse_differences(values, summaries, gather)


#: The int32 codes a record `telling_differences` carries may hold (the record padded to it): one size for every
#: record a start may gather first (output_dir's token, 1043 codes, or each process's decision, 1025), whatever the
#: arguments. Both are of fixed size; a larger one would be refused only where it is gathered, the others waiting.
FIRST_RECORD_CODES = 2048


def telling_differences(gather: Gather, args: Any, task_arguments: Sequence[Any] = ()) -> Gather:
    """`gather` whose first call also carries this process's compared-arguments digest, the record padded to
    `FIRST_RECORD_CODES` int32 codes: processes given other arguments may gather other records first (the token of
    `shared_output_dir` only where they checkpoint), so that gather has one size on all. Where the digests differ,
    every process raises the `ArgumentError` of `check_same_arguments` from it (a second gather for the values);
    later calls are `gather`'s own. A record gathered after this process's own checks (`start_agreement`'s) may
    come with its own error: the refusal raised then has it as its cause."""
    values = compared_values(args, task_arguments)
    summary, first = summary_record(values).astype(np.int32), [True]

    def gather_telling(record: np.ndarray) -> np.ndarray:
        if not first:
            return gather(record)
        first.clear()
        record = np.asarray(record)
        if record.size > FIRST_RECORD_CODES:
            raise ValueError(f"a first record of {record.size} codes exceeds FIRST_RECORD_CODES")
        padded = np.zeros(SUMMARY_BYTES + FIRST_RECORD_CODES, dtype=np.int32)
        padded[:SUMMARY_BYTES], padded[SUMMARY_BYTES:SUMMARY_BYTES + record.size] = summary, record.reshape(-1)
        rows = np.asarray(gather(padded)).reshape(-1, padded.size)
        _refuse_differences(values, rows[:, :SUMMARY_BYTES].astype(np.uint8), gather)
        return rows[:, SUMMARY_BYTES:SUMMARY_BYTES + record.size].astype(record.dtype)
    return gather_telling


def _refuse_differences(values: Mapping[str, Any], summaries: np.ndarray, gather: Gather) -> None:
    """Given every process's `summary_record`: nothing where all are equal, else the values gathered (all processes
    see the same summaries, so all gather them) and the `ArgumentError` naming each differing field."""
    if all((row == summaries[0]).all() for row in summaries):
        return
    size = max(int.from_bytes(row[_DIGEST_BYTES:].tobytes(), "little") for row in summaries)
    records = np.asarray(gather(values_record(values, size))).reshape(-1, size)
    found = differences([values_of(record) for record in records])
    if not found:  # equal values, other JSON (cannot happen with one library version): nothing to name
        return
    shown = "; ".join(f"{name} (" + "; ".join(f"process {index}: {_shown(value)}" for index, value in seen.items())
                      + ")" for name, seen in found.items())
    raise ArgumentError(next(iter(found)), f"the processes were given other arguments: {shown}. Each process "
                        "builds the run from its own arguments, so they would train on other batches, updates or "
                        "parameters than one another (or wait forever for one another). Give every process the "
                        "same arguments (the same command line or --config file), then rerun; only "
                        f"{', '.join(PER_HOST_FIELDS)} may differ per host.")
