"""A stop signal (SIGTERM, SIGINT) while a run sets up, before its first step: the run ends with exit status 75, at
once where nothing of it is being written, else at the next safe point; its checkpoints stay untouched, its
output_dir unlocked, and `job.json` says `stopped`."""

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from easytrain import BaseTrainer, TrainingArguments, host_memory, stop_signals
from easytrain.checkpoint import finalized_steps
from easytrain.cli import run
from easytrain.jobs import read_job
from easytrain.trainers.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from easytrain.trainers.run_dir import check_output_dir
from easytrain.trainers.run_lock import LOCK_FILENAME
from runs import child_env, xla_flags

SETUP_TASKS = '''
"""Trainers (`--task setup_tasks:...`) that are sent a stop signal at one phase of their set-up."""
import os
import signal
import time
from pathlib import Path

import jax

from easytrain import BaseTrainer


def signal_self(sig):
    """Send `sig` to this process, once easytrain catches it (Python's default would kill it or raise)."""
    assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler), f"nothing catches {sig.name}"
    os.kill(os.getpid(), sig)


def announce_then_wait(output_dir):
    """Touch `<output_dir>.preparing<process index>`, then take two minutes, or until `<output_dir>.go` exists."""
    Path(f"{output_dir}.preparing{jax.process_index()}").touch()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not Path(f"{output_dir}.go").exists():
        time.sleep(0.05)


class SlowDataTrainer(BaseTrainer):
    """Its data takes minutes to prepare (tokenising a large corpus)."""

    def prepare_datasets(self):
        announce_then_wait(self.arguments.output_dir)
        return super().prepare_datasets()


class SignalWhileClaimingTrainer(BaseTrainer):
    """SIGTERM arrives while output_dir is being claimed (`save_arguments` is part of the claim)."""

    def save_arguments(self):
        signal_self(signal.SIGTERM)
        return super().save_arguments()


class SignalWhileCompilingTrainer(BaseTrainer):
    """SIGTERM arrives while the first train step compiles."""

    def plan_memory(self, state, batch):
        signal_self(signal.SIGTERM)
        return super().plan_memory(state, batch)


class SigintWhileBuildingTrainer(BaseTrainer):
    """SIGINT arrives while the model is restored, which takes minutes."""

    def configure_model(self):
        signal_self(signal.SIGINT)
        time.sleep(120)
        return super().configure_model()
'''

FLAGS = dict(max_length=16, train_batch_size=4, eval_batch_size=4, logging_steps=1, eval_strategy="no",
             save_strategy="steps", save_steps=2, report_to=["jsonl"], disable_progress_bar=True,
             save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=8, lr_scheduler_type="constant",
             warmup_ratio=0.0)


def tiny_args(output_dir: Path, **overrides) -> TrainingArguments:
    return TrainingArguments(**{**FLAGS, "output_dir": str(output_dir), **overrides})


def command_line(output_dir: Path, **overrides) -> list[str]:
    """`easytrain train` with `tiny_args`' values."""
    words = [sys.executable, "-m", "easytrain", "train", "--output_dir", str(output_dir)]
    for name, value in {**FLAGS, **overrides}.items():
        words += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return words


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run with its checkpoint of step 2; each test resumes a copy."""
    output_dir = tmp_path_factory.mktemp("trained") / "run"
    BaseTrainer(tiny_args(output_dir, max_steps=2)).train()
    return output_dir


@pytest.fixture
def setup_tasks(tmp_path: Path, monkeypatch):
    """The module of `SETUP_TASKS`, importable as `setup_tasks` here and in child processes."""
    (tmp_path / "setup_tasks.py").write_text(SETUP_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import setup_tasks

    return setup_tasks


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` with its size and modification time: what "untouched" compares."""
    return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(directory.rglob("*")) if path.is_file()}


def unlocked(output_dir: Path) -> bool:
    """Whether another run could take output_dir's lock now (also from this process: `flock` is per open file)."""
    path = output_dir / LOCK_FILENAME
    if not path.exists():
        return True
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def wait_for(paths: list[Path], processes: list[subprocess.Popen], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            pytest.fail("\n".join(p.communicate()[0][-3000:] for p in processes))
        time.sleep(0.05)


# ----------------------------------------------------------------------------- the catch itself

@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Python's own SIGINT handler for every test here, as in a user's process: pytest-xdist's workers ignore SIGINT
    (SIG_IGN), under which a redelivered Ctrl-C does nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def caught():
    """Stop signals caught for the test (and given back after it, whatever happens)."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert stop_signals.catch()
    yield
    stop_signals.release()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_first_signal_is_a_flag_and_a_second_one_acts_as_before(caught) -> None:
    assert not stop_signals.catch(), "a second catch shares the first one's flag"
    stop_signals.check("nothing received yet")
    signal.raise_signal(signal.SIGTERM)
    assert stop_signals.received() == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "a second SIGTERM kills the process"
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "SIGINT is still caught"
    with pytest.raises(stop_signals.SignalInterrupt, match="SIGTERM received while at a safe point") as stopped:
        stop_signals.check("at a safe point")
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.signal_name == "SIGTERM"


def test_an_interruptible_phase_is_left_at_once(caught) -> None:
    started = time.monotonic()
    with pytest.raises(stop_signals.SignalInterrupt) as stopped:
        with stop_signals.interruptible("sleeping"):
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
            time.sleep(60)
    assert stopped.value.during == "sleeping" and time.monotonic() - started < 30
    with pytest.raises(stop_signals.SignalInterrupt, match="SIGINT received while sleeping again"):
        with stop_signals.interruptible("sleeping again"):  # entered after the signal: left at once
            pytest.fail("entered")


def test_a_signal_outside_any_phase_waits_for_a_check(caught) -> None:
    signal.raise_signal(signal.SIGINT)
    time.sleep(0.01)  # nothing raised here: no interruptible section
    assert stop_signals.received() == "SIGINT"


def test_nothing_is_caught_off_the_main_thread() -> None:
    started: list[bool] = []
    worker = threading.Thread(target=lambda: started.append(stop_signals.catch()))
    worker.start()
    worker.join()
    assert started == [False] and not stop_signals.catching()


def test_a_released_catch_can_deliver_the_signal_it_held(caught) -> None:
    """For code that will not look at the flag (another trainer's train(), a multi-process run): as if uncaught."""
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as raised:
        stop_signals.release(redeliver=True)
    assert not isinstance(raised.value, stop_signals.SignalInterrupt), "Python's own KeyboardInterrupt"
    assert stop_signals.received() is None and not stop_signals.catching()


# ----------------------------------------------------------------------------- the easytrain command

SIGNAL_ON_IMPORT = '''
import os
import signal
import sys


class SignalOnImport:
    """Sends SIGTERM to this process when it first imports jax: the command's slowest seconds of start-up."""

    def find_spec(self, name, path=None, target=None):
        if name == "jax":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None


sys.meta_path.insert(0, SignalOnImport())
sys.argv = ["easytrain", *sys.argv[1:]]
from easytrain.command import main

sys.exit(main())
'''


def test_a_stop_while_the_command_starts_exits_75_having_written_nothing(tmp_path: Path) -> None:
    script = tmp_path / "start.py"
    script.write_text(SIGNAL_ON_IMPORT)
    result = subprocess.run([sys.executable, str(script), "train", "--output_dir", str(tmp_path / "run")],
                            env=child_env(**{host_memory.OPT_OUT: "0"}), capture_output=True, text=True, timeout=120)
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    assert "stopped by SIGTERM while starting" in result.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_while_the_command_prepares_its_data_stops_the_job_at_once(trained: Path, tmp_path: Path,
                                                                           setup_tasks) -> None:
    output_dir = copy_of(trained, tmp_path)
    checkpoints = snapshot(output_dir / "checkpoints")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    process = subprocess.Popen(command_line(output_dir, max_steps=4, resume_from_checkpoint="latest",
                                            task="setup_tasks:SlowDataTrainer"),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for([Path(f"{output_dir}.preparing0")], [process])
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)  # the data takes two minutes: not waited for
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    stopped = "stopped by SIGTERM while preparing the data, before step 3: nothing trained"
    assert stopped in output and str(output_dir / "checkpoints" / "2") in output
    record = read_job(output_dir)
    assert (record["status"], record["error"], record["pid"]) == ("stopped", None, process.pid), record
    assert stopped in record["stop_reason"]
    assert snapshot(output_dir / "checkpoints") == checkpoints and unlocked(output_dir)


# ----------------------------------------------------------------------------- a trainer's train()

def test_a_signal_during_the_claim_lets_it_finish_then_stops_with_nothing_opened(tmp_path: Path,
                                                                                setup_tasks) -> None:
    output_dir = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    args = tiny_args(output_dir, max_steps=4, task="setup_tasks:SignalWhileClaimingTrainer")
    with pytest.raises(TrainingPreempted) as stopped:
        run(args)  # `easytrain train`, in this process
    assert (stopped.value.code, stopped.value.step, stopped.value.checkpoint) == (PREEMPTED_EXIT_CODE, 0, None)
    assert "stopped by SIGTERM while claiming the output directory, before step 1: nothing trained; no checkpoint" in (
        str(stopped.value))
    assert json.loads((output_dir / "arguments.json").read_text())["output_dir"] == str(output_dir), "claim finished"
    record = read_job(output_dir)
    assert (record["status"], record["error"]) == ("stopped", None) and "SIGTERM" in record["stop_reason"]
    assert not (output_dir / "metrics.jsonl").exists() and unlocked(output_dir)
    assert check_output_dir(args) is None, "the same command starts afresh in output_dir"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers, "given back"


def test_a_resumed_run_signalled_while_compiling_stops_before_its_first_step(trained: Path, tmp_path: Path,
                                                                            setup_tasks) -> None:
    output_dir = copy_of(trained, tmp_path)
    checkpoints = snapshot(output_dir / "checkpoints")
    args = tiny_args(output_dir, max_steps=4, resume_from_checkpoint="latest")
    trainer = setup_tasks.SignalWhileCompilingTrainer(args)
    with pytest.raises(TrainingPreempted) as stopped:
        trainer.train()
    assert (stopped.value.step, stopped.value.checkpoint) == (2, str(output_dir / "checkpoints" / "2"))
    assert "stopped by SIGTERM while compiling the train step, before step 3: nothing trained" in str(stopped.value)
    assert int(trainer.state.step) == 2, "no step ran"
    assert snapshot(output_dir / "checkpoints") == checkpoints and unlocked(output_dir)
    record = read_job(output_dir)
    assert (record["status"], record["step"], record["error"]) == ("stopped", 2, None)


def test_sigint_while_the_model_is_restored_stops_at_once_keeping_the_checkpoint(trained: Path, tmp_path: Path,
                                                                               setup_tasks) -> None:
    output_dir = copy_of(trained, tmp_path)
    checkpoints = snapshot(output_dir / "checkpoints")
    args = tiny_args(output_dir, max_steps=4, resume_from_checkpoint="latest",
                     task="setup_tasks:SigintWhileBuildingTrainer")
    started = time.monotonic()
    with pytest.raises(TrainingPreempted) as stopped:
        run(args)  # `easytrain train`, in this process
    assert time.monotonic() - started < 90, "the two minutes of the restore were waited for"
    assert (stopped.value.step, stopped.value.checkpoint) == (2, str(output_dir / "checkpoints" / "2"))
    assert "stopped by SIGINT while building the model, before step 3: nothing trained" in str(stopped.value)
    record = read_job(output_dir)
    assert (record["status"], record["error"], record["pid"]) == ("stopped", None, os.getpid())
    assert snapshot(output_dir / "checkpoints") == checkpoints and unlocked(output_dir)
    assert not (output_dir / "superseded_checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C acts as before again"


# ----------------------------------------------------------------------------- multi-process runs

@pytest.mark.slow
def test_sigterm_to_one_process_while_it_sets_up_stops_both_at_the_same_checkpoint(tmp_path: Path,
                                                                                  setup_tasks) -> None:
    """JAX's preemption service keeps SIGTERM in multi-process runs: both processes stop after the first step."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        output_dir, port = tmp_path / "run", probe.getsockname()[1]
    env = child_env(XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    processes = [subprocess.Popen([*command_line(output_dir, max_steps=100, train_batch_size=8, eval_batch_size=8,
                                                 task="setup_tasks:SlowDataTrainer"),
                                   "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                   "--process_id", str(index)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for index in range(2)]
    wait_for([Path(f"{output_dir}.preparing{index}") for index in range(2)], processes)
    processes[1].send_signal(signal.SIGTERM)  # only the non-logging process is told
    time.sleep(1.0)  # then both go on setting up
    Path(f"{output_dir}.go").touch()
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [PREEMPTED_EXIT_CODE] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    (stopped_at,) = finalized_steps(output_dir / "checkpoints")
    for output in outputs:
        assert f"stopped by SIGTERM after step {stopped_at}" in output
