"""Helpers shared by the tests: the small checkpointed run the resume tests start from and copies of a run, read a
run's logged metrics, stop or fail a run at a given step, run a script on 8 CPU devices, an environment in which the
`easytrain` command would relaunch itself for huge pages."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from easytrain import Callback, TrainingArguments, compiler_options, host_memory

ROOT = Path(__file__).resolve().parents[1]
#: A directory whose sitecustomize hides PyTorch from the process that has it on its PYTHONPATH.
WITHOUT_TORCH = str(Path(__file__).resolve().parent / "without_torch")

#: Whether the `easytrain` command relaunches itself with huge pages here (`host_memory`'s own rule, on Linux).
RELAUNCHES_FOR_HUGE_PAGES = sys.platform == "linux" and host_memory.would_help({}, host_memory.thp_mode(),
                                                                             host_memory.glibc_version())


def env_without_huge_pages(**extra: str) -> dict[str, str]:
    """This process's environment (JAX on the CPU) without the tunable and the opt-out, so a relaunch can happen."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def without_hidden_torch(pythonpath: str) -> str:
    """`pythonpath` without WITHOUT_TORCH: the processes started with it may import PyTorch."""
    return os.pathsep.join(entry for entry in pythonpath.split(os.pathsep) if entry and entry != WITHOUT_TORCH)


def children_without_torch(pythonpath: str) -> str:
    """`pythonpath` with WITHOUT_TORCH in front: the processes started with it import no PyTorch."""
    return os.pathsep.join(filter(None, [WITHOUT_TORCH, without_hidden_torch(pythonpath)]))


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that imports easytrain from this checkout: PYTHONPATH is the
    checkout, after WITHOUT_TORCH where the suite put it there (tests/conftest.py); then `extra`."""
    hides_torch = WITHOUT_TORCH in os.environ.get("PYTHONPATH", "").split(os.pathsep)
    pythonpath = os.pathsep.join([WITHOUT_TORCH] * hides_torch + [str(ROOT)])
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


#: XLA:CPU's LLVM level for a child that trains hundreds of steps: -O1 steps as fast as XLA's default -O3 on
#: the suite's models, -O0 (the suite's level, tests/conftest.py) twice as slow.
LONG_TRAINING_LEVEL = 1


def long_training_flags() -> str:
    """This process's `XLA_FLAGS` at `LONG_TRAINING_LEVEL` instead of the suite's level, with XLA's own fusion
    emitters (the suite turns them off, tests/conftest.py): for a child whose programs run long enough that their
    speed outweighs their compile time. At -O1 the fusion emitters' SFT step of examples/dpo_arithmetic.py (16 rows)
    took 56 ms against 69 ms, its compile 1.4-1.6 s against 1.3 s (2 Intel Xeon cores)."""
    level = f"--xla_backend_optimization_level={LONG_TRAINING_LEVEL}"
    kept = [flag for flag in xla_flags_without("--xla_backend_optimization_level")
            if not flag.startswith("--xla_cpu_use_fusion_emitters")]
    return " ".join([*kept, level])


def long_training_options() -> str:
    """`compiler_options` for a trainer in the test process that trains tens of steps: easytrain's own CPU
    options at `LONG_TRAINING_LEVEL`, for its train and eval steps only (the rest stays at the suite's level)."""
    options = {**compiler_options.backend_defaults("cpu"), "xla_backend_optimization_level": LONG_TRAINING_LEVEL}
    return ",".join(f"{name}={value}" for name, value in options.items())


def long_training_env(**extra: str) -> dict[str, str]:
    """`child_env` for a child that trains hundreds of steps: compiled at `LONG_TRAINING_LEVEL`."""
    return child_env(XLA_FLAGS=long_training_flags(), **extra)


def args_for(output_dir, **overrides) -> TrainingArguments:
    """A 4-step run of 64 rows checkpointed at steps 2 and 4 (`finished_run` in tests/conftest.py), with `overrides`."""
    values = dict(output_dir=str(output_dir), max_length=16, train_batch_size=4, eval_batch_size=4, max_steps=4,
                  logging_steps=1, eval_strategy="no", save_strategy="steps", save_steps=2, report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
                  max_eval_samples=16)
    return TrainingArguments(**(values | overrides))


def copied_run(run: Path, destination: Path) -> Path:
    """A copy of the finished `run` at `destination`, for one test to change: the run trained once for a module (or
    a test process) stays as it was for the next test."""
    return Path(shutil.copytree(run, destination))


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory`."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def logged(output_dir, key: str = "loss", split: str = "train") -> dict[int, float]:
    """`step -> value` of one metric from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line[key] for line in lines if line["split"] == split and key in line}


class StopAt(Callback):
    """Ends training after `step` (the loop then checkpoints it, as a preempted run would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step:
            trainer.should_stop = True


class FailAt(Callback):
    """Raises at the end of `step`, as a failing callback (or a killed process) does: nothing checkpoints that step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step:
            raise RuntimeError(f"a failing callback at step {step}")


class FailAtSave(Callback):
    """Raises in `on_save` of `step`, once the save of that step has started: the run's own failure after it."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, trainer, step, checkpoint_dir):
        if step == self.step:
            raise RuntimeError(f"a failing on_save at step {step}")


def xla_flags(devices: int | None) -> str:
    """This process's `XLA_FLAGS` (the suite's compile settings, tests/conftest.py) with `devices` CPU devices
    (None: no device count)."""
    count = [f"--xla_force_host_platform_device_count={devices}"] if devices is not None else []
    return " ".join([*xla_flags_without("--xla_force_host_platform_device_count"), *count])


def xla_flags_without(flag: str) -> list[str]:
    """This process's `XLA_FLAGS`, each setting of `flag` left out (to be set anew)."""
    return [kept for kept in os.environ.get("XLA_FLAGS", "").split() if not kept.startswith(flag)]


def facts_on_eight_devices(script: str | Path, *args: str, script_sets_devices: bool = False) -> dict:
    """Run `script` in a fresh process with 8 CPU devices and return the JSON of its last printed line.

    `script_sets_devices`: pass this process's other XLA flags without a device count, which the script adds.
    """
    env = child_env(XLA_FLAGS=xla_flags(None if script_sets_devices else 8), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_on_localhost(per_process: list[list[str]], port: int, timeout: float) -> tuple[list[int], list[str]]:
    """`easytrain train` as one process per argument list, joined by a coordinator on localhost at `port` (2 CPU
    devices each): their exit statuses and outputs. Processes still running at `timeout` are killed and the test
    fails as hung, showing the end of each output."""
    import pytest

    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    processes = [subprocess.Popen([sys.executable, "-m", "easytrain", "train", *args,
                                   "--coordinator_address", f"127.0.0.1:{port}", "--num_processes",
                                   str(len(per_process)), "--process_id", str(index)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for index, args in enumerate(per_process)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail("the processes hung: " + "\n".join(p.communicate()[0][-2000:] for p in processes))
    return [process.returncode for process in processes], outputs


def as_processes(process: Callable[[int], None], count: int, what: str) -> None:
    """`process(index)` in one thread per emulated process, all started, then joined (none may hang in `what`)."""
    threads = [threading.Thread(target=process, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), f"a process hung in {what}"
