"""The `easytrain train` command: help, errors, and driving any TrainerProtocol implementation."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from easytrain import TrainingArguments
from easytrain.arguments import field_names
from easytrain.cli import main, run

from runs import child_env

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv: str, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "easytrain", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def test_help_lists_every_argument(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    missing = [name for name in field_names() if f"--{name}" not in out]
    assert not missing


def test_version_names_easytrain_and_the_stack_a_bug_report_needs(capsys):
    import importlib.metadata

    import easytrain

    assert main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"easytrain {easytrain.__version__} (jax {importlib.metadata.version('jax')}, ")
    assert f"flax {importlib.metadata.version('flax')}" in line and "Python 3." in line
    assert easytrain.__version__ == importlib.metadata.version("easytrain"), "pyproject.toml and __version__ differ"


def test_bad_argument_exits_with_a_clear_message(capsys):
    assert main(["train", "--train_batch_size", "0"]) == 2
    assert "train_batch_size: must be a positive integer" in capsys.readouterr().err


def test_python_dash_m_trains_and_exports(tmp_path):
    result = cli("train", "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--max_length", "32",
                 "--train_batch_size", "8", "--eval_batch_size", "8", "--disable_progress_bar",
                 "--max_eval_samples", "8", "--report_to", "jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"eval_loss", "eval_perplexity", "eval_exact_match", "train_loss"} <= set(summary)
    run_dir = tmp_path / "run"
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "3").is_dir()
    assert json.loads((run_dir / "arguments.json").read_text())["max_steps"] == 3


HAND_WRITTEN = '''
"""A trainer written from scratch, sharing nothing with BaseTrainer but the protocol."""
import jax, jax.numpy as jnp, numpy as np, optax
from easytrain.protocol import ConfiguredDataloaders, ConfiguredFunctions, ConfiguredModel

class LinearRegressionTrainer:
    def __init__(self, arguments):
        self._arguments = arguments
        self._x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
        self._y = self._x @ np.array([1.0, -2.0, 0.5], np.float32)
        self._tx = optax.sgd(arguments.learning_rate)
        self._params = jnp.zeros(3)
        self._opt = self._tx.init(self._params)
    arguments = property(lambda self: self._arguments)
    dataset_train = property(lambda self: (self._x, self._y))
    dataset_eval = property(lambda self: (self._x, self._y))
    model = property(lambda self: self._params)
    state = property(lambda self: (self._params, self._opt))
    dtype = property(lambda self: jnp.float32)
    param_dtype = property(lambda self: jnp.float32)
    optimizer = property(lambda self: self._tx)
    scheduler = property(lambda self: optax.constant_schedule(self._arguments.learning_rate))
    def configure_model(self): return ConfiguredModel(self._params, self.state, None, None)
    def configure_dataloaders(self): return ConfiguredDataloaders(self.dataset_train, self.dataset_eval, 1, 1)
    def configure_functions(self):
        loss = lambda p, x, y: jnp.mean((x @ p - y) ** 2)
        def step(state, batch):
            p, o = state
            value, g = jax.value_and_grad(loss)(p, *batch)
            u, o = self._tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), {"loss": value}
        return ConfiguredFunctions(jax.jit(step), jax.jit(lambda s, b: {"loss": loss(s[0], *b)}))
    def train(self):
        step = self.configure_functions().train_step
        for _ in range(self._arguments.max_steps):
            (self._params, self._opt), metrics = step(self.state, self.dataset_train)
        return {"loss": float(metrics["loss"])}
    def evaluate(self):
        return {"eval_loss": float(self.configure_functions().eval_step(self.state, self.dataset_eval)["loss"])}
    def save_pretrained(self, directory):
        return directory
'''


def test_cli_drives_a_hand_written_protocol_implementation(tmp_path, monkeypatch):
    (tmp_path / "hand_written_trainer.py").write_text(textwrap.dedent(HAND_WRITTEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = TrainingArguments(task="hand_written_trainer:LinearRegressionTrainer", max_steps=50,
                             learning_rate=0.1, output_dir=str(tmp_path / "out"))
    summary = run(args)
    assert summary["eval_loss"] < 0.01 < summary["train_loss"] + 1  # it learned y = x @ [1, -2, 0.5]
    from hand_written_trainer import LinearRegressionTrainer

    from easytrain import TrainerProtocol
    assert isinstance(LinearRegressionTrainer(args), TrainerProtocol)


def test_unknown_task_is_named():
    with pytest.raises(Exception, match="task"):
        run(TrainingArguments(task="no_such_module:Nothing"))


@pytest.mark.parametrize("process_index, writes", [(0, True), (1, False)])
def test_only_process_zero_writes_results_json(tmp_path, monkeypatch, process_index, writes):
    import jax

    (tmp_path / "hand_written_trainer.py").write_text(textwrap.dedent(HAND_WRITTEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(jax, "process_index", lambda: process_index)  # the jax that easytrain.cli calls
    args = TrainingArguments(task="hand_written_trainer:LinearRegressionTrainer", max_steps=2,
                             output_dir=str(tmp_path / "out"))
    summary = run(args)
    assert {"train_loss", "eval_loss"} <= set(summary)  # every process still returns the summary
    assert (Path(args.output_dir) / "results.json").is_file() is writes


NAN_TASK = '''
import numpy as np

from easytrain import BaseTrainer, LossOutput, causal_lm_loss


class NaNLossTrainer(BaseTrainer):
    def compute_loss(self, model, batch, rng, train, frozen):
        out = causal_lm_loss(model, batch, rng, train, frozen)
        return LossOutput(out.loss_sum * np.nan, out.count, out.metrics)
'''
TINY = ["--max_length", "16", "--train_batch_size", "4", "--eval_batch_size", "4", "--max_steps", "3",
        "--max_train_samples", "64", "--max_eval_samples", "8", "--report_to", "jsonl", "--disable_progress_bar",
        "--save_pretrained_at_end", "false", "--non_finite_policy", "stop", "--task", "nan_task:NaNLossTrainer"]


def test_a_failure_during_training_exits_1_a_refusal_before_it_2(tmp_path, monkeypatch, capsys):
    """2 is for what fails before training (arguments, the output directory): fix the command and rerun."""
    (tmp_path / "nan_task.py").write_text(NAN_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--output_dir", str(tmp_path / "run"), *TINY]) == 1
    assert "non-finite loss or gradient at step 1" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "job.json").read_text())["error"]["type"] == "NonFiniteLossError"
    assert main(["train", "--output_dir", str(tmp_path / "run"), *TINY]) == 2  # its checkpoint: refused
    assert "already holds a run with checkpoints" in capsys.readouterr().err


def test_results_json_is_strict_json_with_non_finite_values(tmp_path, monkeypatch):
    (tmp_path / "hand_written_trainer.py").write_text(textwrap.dedent(HAND_WRITTEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = TrainingArguments(task="hand_written_trainer:LinearRegressionTrainer", max_steps=5, learning_rate=1e30,
                             output_dir=str(tmp_path / "out"))  # diverges: the losses overflow
    summary = run(args)

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    written = json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=refuse)
    assert written["eval_loss"] in ("nan", "inf") and written["eval_loss"] == str(summary["eval_loss"])
