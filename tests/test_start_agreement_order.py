"""A single process meets the checks moved into the start every process agrees on (`start_agreement`) in the order
it met them before they moved, and a start refused there changes nothing process-wide: the files a trainer's
arguments name are read first (before its checkpoints are looked at), the compilation cache is enabled last (after
the mesh), and in a multi-process run whose processes look at their checkpoints twice each input is read once."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import pytest
from easytrain import BaseTrainer, compilation_cache
from easytrain.checkpoint import CheckpointNotFoundError
from easytrain.data.errors import DataError
from easytrain.errors import ArgumentError, OutputDirError
from easytrain.models.hf_io import CheckpointError
from easytrain.trainers import run_dir, start_agreement
from easytrain.trainers.sft import SFTArguments, SFTTrainer
from runs import args_for
from test_compilation_cache import jax_settings  # noqa: F401 - a fixture
from test_start_agreement_reads import ADAPTER
from test_unreadable_records_agreement import _built_on, _process


def _first_error(build, args) -> BaseException:
    with pytest.raises(Exception) as caught:
        build(args)
    return caught.value


@pytest.mark.parametrize("kind", ["chat_template_path", "lora_adapter_path"])
def test_an_input_it_cannot_read_is_refused_before_its_checkpoints_are_looked_at(tmp_path, kind):
    """Before the reads moved into the start: SFT read its chat template ahead of `BaseTrainer.__init__`, and the
    trainer its adapter config ahead of `check_output_dir`; a `latest` with nothing to resume came second."""
    missing = str(tmp_path / "missing")
    build = (functools.partial(SFTTrainer, sft_arguments=SFTArguments(chat_template_path=missing))
             if kind == "chat_template_path" else BaseTrainer)
    extra = {"lora_adapter_path": missing} if kind == "lora_adapter_path" else {}
    error = _first_error(build, args_for(tmp_path / "run", resume_from_checkpoint="latest", **extra))
    assert not isinstance(error, CheckpointNotFoundError), f"{kind}: {error!r}"
    if kind == "chat_template_path":
        assert isinstance(error, DataError), repr(error)
    else:  # the reader's error, under the argument that pointed at the file
        assert isinstance(error, ArgumentError) and isinstance(error.__cause__, CheckpointError), repr(error)


@pytest.mark.usefixtures("jax_settings")
def test_a_compilation_cache_it_cannot_create_is_refused_after_output_dir_and_the_mesh(tmp_path):
    (blocker := tmp_path / "file").write_text("not a directory")
    cache = str(blocker / "cache")
    (taken := tmp_path / "taken").mkdir()
    (taken / "results.json").write_text("{}")  # another run's
    error = _first_error(BaseTrainer, args_for(taken, compilation_cache_dir=cache))
    assert isinstance(error, OutputDirError), repr(error)
    error = _first_error(BaseTrainer, args_for(tmp_path / "run", compilation_cache_dir=cache,
                                               tensor_parallel_size=jax.device_count() + 1))
    assert isinstance(error, ArgumentError) and error.field == "tensor_parallel_size", repr(error)


@pytest.mark.usefixtures("jax_settings")
def test_a_refused_start_leaves_the_compilation_cache_as_it_was(tmp_path):
    """JAX's cache is process-wide: a trainer refused for its output_dir neither points it elsewhere nor makes
    its directory. Before it was enabled inside the start, the refusal came first."""
    (taken := tmp_path / "taken").mkdir()
    (taken / "results.json").write_text("{}")
    before = jax.config.jax_compilation_cache_dir
    error = _first_error(BaseTrainer, args_for(taken, compilation_cache_dir=str(tmp_path / "cache")))
    assert isinstance(error, OutputDirError), repr(error)
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "cache").exists()


@pytest.mark.usefixtures("jax_settings")
def test_processes_that_look_twice_read_each_input_once(run_copy, tmp_path, monkeypatch):
    """Process 1 sees step 2 as `latest` at its first look (a mount showing step 4 late), so the processes look
    again: the trainer's own inputs (`check_inputs`), the adapter config, its mesh (`configure_mesh`) and the
    compilation cache directory are each read or made once per process, not once per look (nor the directory a
    second time once the start is agreed: it was, by `enable`)."""
    (adapter := tmp_path / "adapter").mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(ADAPTER))
    calls: dict[str, list[int]] = {"check_inputs": [], "adapter_config.json": [], "configure_mesh": [], "cache": []}
    real_read, real_resolve = Path.read_text, run_dir.resolve_checkpoint

    def read_text(path, *args, **kwargs):
        if path.name == "adapter_config.json":
            calls[path.name].append(_process.index)
        return real_read(path, *args, **kwargs)

    def late_on_process_1(output_dir, value):
        root, step = real_resolve(output_dir, value)
        first, _process.looked = not getattr(_process, "looked", False), True
        return (root, 2) if _process.index == 1 and first else (root, step)

    class Counting(BaseTrainer):
        def check_inputs(self) -> None:
            calls["check_inputs"].append(_process.index)

        def configure_mesh(self):
            calls["configure_mesh"].append(_process.index)
            return super().configure_mesh()

    real_make = compilation_cache.make_directory

    def make_directory(setting):
        calls["cache"].append(_process.index)
        return real_make(setting)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(run_dir, "resolve_checkpoint", late_on_process_1)
    monkeypatch.setattr(start_agreement, "RETRY_SECONDS", 0.0)
    monkeypatch.setattr(compilation_cache, "make_directory", make_directory)
    args = args_for(run_copy, max_steps=6, resume_from_checkpoint="latest", lora_adapter_path=str(adapter),
                    compilation_cache_dir=str(tmp_path / "cache"))
    outcomes, collective = _built_on(2, args, monkeypatch, Counting)
    assert all(isinstance(outcome, Counting) for outcome in outcomes), outcomes
    assert [outcome._resume_from[1] for outcome in outcomes] == [4, 4] and collective.calls == 3  # token, 2 looks
    for name, processes in calls.items():  # the cache directory once in the start, not again by `enable` after it
        assert sorted(processes) == [0, 1], f"{name}: on processes {sorted(processes)}"
