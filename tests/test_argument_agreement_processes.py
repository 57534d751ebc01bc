"""Every process of a multi-process run must be given the same arguments: one given another batch size, learning
rate or seed trains on its own idea of the run (a global batch the size of neither, diverging updates, other
parameter shards), and one given another LoRA rank dies in the first collective. Set-up compares the arguments
of every process (less the per-host ones) and every process refuses with the same error, naming the fields."""

import dataclasses
import json

import numpy as np
import pytest

from easytrain import TrainingArguments
from easytrain.cli import REFUSED_EXIT_CODE
from easytrain.errors import ArgumentError
from easytrain.trainers import argument_agreement
from easytrain.trainers.dpo_arguments import DPOArguments
from easytrain.trainers.sft import SFTArguments


def _args(**overrides) -> TrainingArguments:
    return TrainingArguments(**(dict(output_dir="/tmp/run", max_length=16, train_batch_size=8) | overrides))


def _gather_with(*others: tuple[TrainingArguments, tuple]):
    """A `process_allgather` over this process's record and the records the `others` processes would send, for
    each of the check's gathers in turn (the digests, then, only on a mismatch, the values)."""
    values = [argument_agreement.compared_values(args, task) for args, task in others]
    calls = []

    def gather(record: np.ndarray) -> np.ndarray:
        calls.append(record.size)
        if len(calls) == 1:
            rest = [argument_agreement.summary_record(value) for value in values]
        else:
            rest = [argument_agreement.values_record(value, record.size) for value in values]
        return np.stack([record, *rest])
    gather.calls = calls
    return gather


def test_the_same_arguments_pass_with_one_small_gather():
    gather = _gather_with((_args(), (SFTArguments(),)))
    argument_agreement.check_same_arguments(_args(), (SFTArguments(),), gather)
    assert gather.calls == [argument_agreement.SUMMARY_BYTES]


def test_per_host_fields_may_differ():
    here = _args(process_id=0, coordinator_address="localhost:1234", num_processes=2, train_file="/a/train.txt",
                 compilation_cache_dir="/local/a", preprocessing_num_workers=4, disable_progress_bar=True)
    there = _args(process_id=1, coordinator_address="10.0.0.1:1234", num_processes=2, output_dir="/mnt/b/run",
                  train_file="/b/train.txt", compilation_cache_dir="auto", preprocessing_num_workers=None)
    gather = _gather_with((there, ()))
    argument_agreement.check_same_arguments(here, (), gather)
    assert set(argument_agreement.PER_HOST_FIELDS) <= {f.name for f in dataclasses.fields(TrainingArguments)}


def test_differing_fields_are_named_with_every_value_on_every_process():
    other = _args(learning_rate=0.01, train_batch_size=16, seed=7)
    with pytest.raises(ArgumentError) as caught:
        argument_agreement.check_same_arguments(_args(), (), _gather_with((other, ())))
    message = str(caught.value)
    assert caught.value.field == "learning_rate"
    for text in ("learning_rate (process 0: 0.001; process 1: 0.01)", "train_batch_size (process 0: 8; process 1: 16)",
                 "seed (process 0: 42; process 1: 7)"):
        assert text in message, message
    assert "max_length" not in message


def test_task_arguments_are_compared_under_their_class_name():
    with pytest.raises(ArgumentError, match=r"SFTArguments\.max_new_tokens \(process 0: 64; process 1: 8\)"):
        argument_agreement.check_same_arguments(_args(), (SFTArguments(),),
                                                _gather_with((_args(), (SFTArguments(max_new_tokens=8),))))


def test_another_task_arguments_class_is_a_difference():
    with pytest.raises(ArgumentError, match=r"DPOArguments\.beta \(process 0: \(not given\); process 1: 0\.1\)"):
        argument_agreement.check_same_arguments(_args(), (SFTArguments(),), _gather_with((_args(), (DPOArguments(),))))


def test_only_processes_that_differ_from_process_0_are_listed():
    same, other = (_args(lora_rank=4), ()), (_args(lora_rank=8), ())
    with pytest.raises(ArgumentError) as caught:
        argument_agreement.check_same_arguments(_args(lora_rank=4), (), _gather_with(same, other))
    assert "lora_rank (process 0: 4; process 2: 8)" in str(caught.value)
    assert "process 1" not in str(caught.value)


def test_long_values_are_shortened():
    other = _args(stop_file="STOP" + "x" * 500)
    with pytest.raises(ArgumentError) as caught:
        argument_agreement.check_same_arguments(_args(), (), _gather_with((other, ())))
    assert len(str(caught.value)) < 1000 and "..." in str(caught.value)


def test_values_survive_the_encoding():
    values = argument_agreement.compared_values(_args(report_to=["jsonl", "csv"]), (SFTArguments(packing=True),))
    record = argument_agreement.values_record(values, 1 << 14)
    assert argument_agreement.values_of(record) == json.loads(json.dumps(values))
    assert values["SFTArguments.packing"] is True and "output_dir" not in values and "process_id" not in values


def test_objects_in_task_arguments_compare_by_type_not_address():
    @dataclasses.dataclass
    class Options:
        scorer: object
        path: object

    from pathlib import Path
    here, there = Options(object(), Path("/data/a")), Options(object(), Path("/data/b"))
    assert argument_agreement.compared_values(_args(), (here,))["Options.scorer"] == "<object>"
    with pytest.raises(ArgumentError) as caught:
        argument_agreement.check_same_arguments(_args(), (here,), _gather_with((_args(), (there,))))
    assert caught.value.field == "Options.path" and "scorer" not in str(caught.value)


_SET_DIGEST = """
import dataclasses
from easytrain import TrainingArguments
from easytrain.trainers import argument_agreement

@dataclasses.dataclass
class Tokens:
    dropped: frozenset = frozenset({"<a>", "<b>", "<c>", "<d>", "<e>", "<f>"})

args = TrainingArguments(output_dir="/tmp/run", max_length=16, train_batch_size=8)
print(list(Tokens().dropped))
print(argument_agreement.summary_record(argument_agreement.compared_values(args, [Tokens()])).tobytes().hex())
"""


def test_equal_sets_agree_whatever_each_process_hash_seed():
    """A set's repr lists its elements in an order that depends on PYTHONHASHSEED, random per process. Two seeds
    that order the set differently are enough (checked first, so the test can fail)."""
    import os
    import subprocess
    import sys

    outputs = [subprocess.run([sys.executable, "-c", _SET_DIGEST], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split() for seed in ("1", "2")]
    orders, digests = {tuple(output[:-1]) for output in outputs}, {output[-1] for output in outputs}
    assert len(orders) == 2, f"both seeds iterate the set alike: {orders}"
    assert len(digests) == 1, digests


def test_a_dict_with_keys_of_mixed_types_is_compared():
    @dataclasses.dataclass
    class Weights:
        by_label: dict

    values = argument_agreement.compared_values(_args(), (Weights({1: 0.5, "other": 2.0}),))
    assert values["Weights.by_label"] == {"1": 0.5, "other": 2.0}
    assert argument_agreement.summary_record(values).size == argument_agreement.SUMMARY_BYTES
    assert argument_agreement.compared_values(_args(), (Weights({"other": 2.0, 1: 0.5}),)) == values
    assert argument_agreement.compared_values(_args(), (Weights({(1, 2): 0.5}),))["Weights.by_label"] == {
        "(1, 2)": 0.5}


# ------------------------------------------------------------------ two processes on localhost
FLAGS = ["--max_length", "16", "--eval_batch_size", "8", "--logging_steps", "1", "--eval_strategy", "no",
         "--save_strategy", "no", "--report_to", "jsonl", "--disable_progress_bar", "--save_pretrained_at_end",
         "false", "--max_steps", "3", "--validation_split_percentage", "0"]


def _train_two(tmp_path, tokenizer_dir, text_lines, per_process: list[list[str]]) -> tuple[list[int], list[str]]:
    from runs import train_on_localhost
    from test_multiprocess import free_port

    (train := tmp_path / "train.txt").write_text("\n".join(text_lines) + "\n")
    common = ["--output_dir", str(tmp_path / "run"), "--train_file", str(train), "--tokenizer_name", tokenizer_dir,
              *FLAGS]
    return train_on_localhost([[*common, *extra] for extra in per_process], free_port(), timeout=300)


def _job_status(tmp_path) -> str:
    """job.json's status, where its error is the refusal (else the whole record, for the assertion to show); "not
    started" where the start was refused when the trainers were built, before job.json, leaving no output_dir."""
    if not (tmp_path / "run").exists():
        return "not started"
    record = json.loads((tmp_path / "run" / "job.json").read_text())
    refused = "the processes were given other arguments" in ((record["error"] or {}).get("message") or "")
    return record["status"] if refused else record


@pytest.fixture(scope="module")
def refused(tmp_path_factory, tokenizer_dir, text_lines) -> tuple[list[int], list[str], str]:
    """One pair of processes given another batch size, learning rate and LoRA rank: each test below reads what it
    guards from the refusal, which names every differing field (a pair's start costs more than its check)."""
    tmp_path = tmp_path_factory.mktemp("refused")
    codes, outputs = _train_two(tmp_path, tokenizer_dir, text_lines, [
        ["--train_batch_size", "8", "--lora_rank", "4"],
        ["--train_batch_size", "16", "--learning_rate", "0.01", "--lora_rank", "8"]])
    return codes, outputs, _job_status(tmp_path)


@pytest.mark.slow
def test_two_processes_given_other_batch_size_and_learning_rate_both_refuse(refused):
    """Without the check, these fields alone differing, both train a 12-row global batch at their own learning
    rates and exit 0 (here, the LoRA ranks differing too, both abort in Gloo)."""
    codes, outputs, status = refused
    assert codes == [REFUSED_EXIT_CODE] * 2, f"exit statuses {codes}: trained on other arguments"
    for output in outputs:
        assert "train_batch_size (process 0: 8; process 1: 16)" in output, output[-3000:]
        assert "learning_rate (process 0: 0.001; process 1: 0.01)" in output, output[-3000:]
    assert status == "not started"  # refused in the start's first gather, before job.json (at set-up, it failed)


@pytest.mark.slow
def test_two_processes_given_other_lora_ranks_refuse_before_the_first_collective(refused):
    """Without the check the processes abort in Gloo (a collective of other sizes) and job.json stays queued."""
    codes, outputs, status = refused
    assert codes == [REFUSED_EXIT_CODE] * 2, f"exit statuses {codes}, not easytrain's failure"
    for output in outputs:
        assert "lora_rank (process 0: 4; process 1: 8)" in output and "EnforceNotMet" not in output, output[-3000:]
    assert status == "not started"  # refused in the start's first gather, before job.json (at set-up, it failed)
