"""The start every process of a multi-process run agrees on at construction covers each file the trainer reads there
(`lora_adapter_path`'s adapter config included), costs two small gathers where output_dir is shared storage to check
(its token's nonce, then who saw it beside each process's decision), and a start refused leaves no directory
behind. Processes are threads joined by a stand-in for `multihost_utils.process_allgather`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import pytest
from easytrain.data.errors import DataError
from easytrain.errors import ArgumentError
from easytrain.trainers import dpo, shared_output_dir
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.dpo_arguments import DPOArguments
from easytrain.trainers.process_failure import OtherProcessFailedError
from easytrain.trainers.run_dir import check_output_dir
from easytrain.trainers.sft import SFTArguments, SFTTrainer
from jax.experimental import multihost_utils
from runs import args_for, as_processes
from test_compilation_cache import jax_settings  # noqa: F401 - a fixture
from test_unreadable_records_agreement import Collective, _built_on, _process

ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _started_on(count: int, args_of, monkeypatch, check_start=None) -> tuple[list, Collective]:
    """`check_output_dir` as a trainer of an emulated `count`-process run calls it (no gather given: the default
    one, each thread its own process index), `args_of(index)` each process's arguments: what each returned or
    raised, and the collective that counted the gathers."""
    collective, outcomes = Collective(count, timeout=10), [None] * count
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: getattr(_process, "index", 0))
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda record: collective.at(_process.index)(record))

    def process(index: int) -> None:
        _process.index = index
        try:
            outcomes[index] = check_output_dir(args_of(index), is_main_process=index == 0, check_start=check_start)
        except BaseException as error:  # noqa: BLE001 - reported to the test, a KeyboardInterrupt too
            outcomes[index] = error

    as_processes(process, count, "check_output_dir")
    return outcomes, collective


def test_a_checkpointing_run_decides_its_start_in_two_gathers(tmp_path, monkeypatch):
    """output_dir's token nonce, then who saw it carried with each process's decision. Before: three gathers (the
    token's two, then the decision's own)."""
    outcomes, collective = _started_on(2, lambda index: args_for(tmp_path / "run"), monkeypatch)
    assert outcomes == [None, None] and collective.calls == 2, (outcomes, collective.calls)
    assert list((tmp_path / "run").iterdir()) == [], "the token stayed in output_dir"


def test_a_run_that_neither_saves_nor_resumes_decides_in_one_gather(tmp_path, monkeypatch):
    outcomes, collective = _started_on(2, lambda index: args_for(tmp_path / "run", save_strategy="no"), monkeypatch)
    assert outcomes == [None, None] and collective.calls == 1, (outcomes, collective.calls)


def test_a_process_that_cannot_see_output_dir_refuses_alike_whatever_its_own_decision_raised(tmp_path, monkeypatch):
    """Process 1 was given a directory of its own, where `latest` finds no checkpoint: every process still raises the
    same refusal naming output_dir (the cause of the rest), as when the check gathered apart."""
    monkeypatch.setattr(shared_output_dir, "_READ_TRIES", 1)  # no second look for a token that is not there
    (shared := tmp_path / "shared").mkdir()
    (shared / "arguments.json").write_text("{}")  # a started run: `latest` without a checkpoint starts over there
    outcomes, collective = _started_on(2, lambda index: args_for(tmp_path / ("shared", "own")[index],
                                                                 resume_from_checkpoint="latest"), monkeypatch)
    assert all(type(outcome) is ArgumentError and outcome.field == "output_dir" for outcome in outcomes), outcomes
    assert len({str(outcome) for outcome in outcomes}) == 1 and "process 1 cannot see" in str(outcomes[0])
    assert sorted(p.name for p in shared.iterdir()) == ["arguments.json"] and not (tmp_path / "own").exists()


def test_an_interrupt_of_a_process_that_cannot_see_output_dir_stays_an_interrupt(tmp_path, monkeypatch):
    def interrupted_on_process_1(resume):
        if _process.index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(shared_output_dir, "_READ_TRIES", 1)
    outcomes, _ = _started_on(2, lambda index: args_for(tmp_path / f"run{index}"), monkeypatch,
                              check_start=interrupted_on_process_1)
    assert type(outcomes[0]) is ArgumentError and type(outcomes[1]) is KeyboardInterrupt, outcomes


def test_a_start_refused_by_another_process_leaves_no_directory_behind(tmp_path, monkeypatch):
    """Process 1's check of the start refuses after output_dir passed its shared-storage check: process 0 made
    output_dir (and its parents) for its token and removes them again. Before: they stayed."""
    def refused_on_process_1(resume):
        if _process.index == 1:
            raise ArgumentError("init_weights_from", "refused on process 1")

    for save_strategy in ("steps", "no"):
        outcomes, _ = _started_on(2, lambda index: args_for(tmp_path / "new" / "run", save_strategy=save_strategy),
                                  monkeypatch, check_start=refused_on_process_1)
        assert isinstance(outcomes[0], OtherProcessFailedError) and type(outcomes[1]) is ArgumentError, outcomes
        assert list(tmp_path.iterdir()) == [], f"save_strategy={save_strategy}: the refused start left a directory"


@pytest.fixture
def adapter(tmp_path) -> Path:
    (directory := tmp_path / "adapter").mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(ADAPTER))
    return directory


@pytest.mark.parametrize("save_strategy", ["steps", "no"])
def test_a_process_that_cannot_read_the_adapter_config_stops_every_trainer_at_construction(
        tmp_path, adapter, monkeypatch, save_strategy):
    """Process 1 may not read `lora_adapter_path`'s adapter_config.json: it raises its own error, process 0 one naming
    it, and output_dir is not left behind. Before: process 1 raised while reading it, ahead of the agreement, and
    process 0 waited in the agreement's gather for it ('BrokenBarrierError' here, a collective's deadline in a real
    run, naming nothing)."""
    real = Path.read_text

    def denied_on_process_1(path, *args, **kwargs):
        if getattr(_process, "index", None) == 1 and path.name == "adapter_config.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied_on_process_1)
    args = args_for(tmp_path / "new" / "run", lora_adapter_path=str(adapter), save_strategy=save_strategy)
    (first, second), _ = _built_on(2, args, monkeypatch)
    assert type(second) is PermissionError, second
    assert isinstance(first, OtherProcessFailedError), first
    assert "process 1 failed: PermissionError" in str(first) and "adapter_config.json" in str(first), first
    assert not (tmp_path / "new").exists(), "the refused start left output_dir behind"


@pytest.mark.usefixtures("jax_settings")
def test_a_process_that_cannot_create_its_compilation_cache_stops_every_trainer_at_construction(
        tmp_path, monkeypatch):
    """`compilation_cache_dir` may differ per host (`PER_HOST_FIELDS`): process 1 cannot create its own. It raises its
    own `ArgumentError`, process 0 one naming it, and neither points JAX's process-wide cache at it. Before: the
    cache was enabled after the agreement, so process 1 raised alone and process 0 built its trainer, to wait in
    set-up's first collective for it, named nowhere."""
    real, cache = Path.mkdir, tmp_path / "cache"

    def denied_on_process_1(path, *args, **kwargs):
        if getattr(_process, "index", None) == 1 and path == cache:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied_on_process_1)
    before = jax.config.jax_compilation_cache_dir
    args = args_for(tmp_path / "run", save_strategy="no", compilation_cache_dir=str(cache))
    (first, second), _ = _built_on(2, args, monkeypatch)
    assert type(second) is ArgumentError and second.field == "compilation_cache_dir", second
    assert isinstance(first, OtherProcessFailedError), first
    assert "process 1 failed: ArgumentError: compilation_cache_dir" in str(first), first
    assert jax.config.jax_compilation_cache_dir == before


def _denied_on_process_1(monkeypatch, name: str) -> None:
    """Process 1 may not read files called `name` (its host's mount, its user); the others read as usual."""
    real = Path.read_text

    def denied(path, *args, **kwargs):
        if getattr(_process, "index", None) == 1 and path.name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)


def test_a_process_that_cannot_read_the_chat_template_stops_every_sft_trainer_at_construction(tmp_path, monkeypatch):
    """SFT reads `chat_template_path` when it is built. Before: process 1 raised reading it ahead of the agreement
    (even ahead of joining the other processes), and process 0 waited in the agreement's gather for it."""
    (template := tmp_path / "template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    _denied_on_process_1(monkeypatch, template.name)
    build = functools.partial(SFTTrainer, sft_arguments=SFTArguments(chat_template_path=str(template)))
    (first, second), _ = _built_on(2, args_for(tmp_path / "run", save_strategy="no"), monkeypatch, build)
    assert type(second) is DataError and "chat_template_path" in str(second), second
    assert isinstance(first, OtherProcessFailedError) and "process 1 failed: DataError" in str(first), first


def test_a_process_that_cannot_find_the_dpo_reference_stops_every_dpo_trainer_at_construction(tmp_path, monkeypatch):
    """DPO checks `ref_model_name_or_path` (a local path, or a hub id's config) when it is built: one host's mount may
    lack it. Before: process 1 raised ahead of the agreement, and process 0 waited in its gather for it."""
    def missing_on_process_1(path):
        if _process.index == 1:
            raise ArgumentError("ref_model_name_or_path", f"{path!r} does not exist on this host.")

    monkeypatch.setattr(dpo, "check_reference_path", missing_on_process_1)
    build = functools.partial(DPOTrainer, dpo_arguments=DPOArguments(ref_model_name_or_path=str(tmp_path / "ref")))
    (first, second), _ = _built_on(2, args_for(tmp_path / "run", save_strategy="no"), monkeypatch, build)
    assert type(second) is ArgumentError and second.field == "ref_model_name_or_path", second
    assert isinstance(first, OtherProcessFailedError) and "process 1 failed: ArgumentError" in str(first), first
