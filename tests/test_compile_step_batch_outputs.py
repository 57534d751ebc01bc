"""`compile_step(fn, batch_outputs=...)` returns outputs split over the data-parallel axes like the batch, so a
function compiled for `train_iteration` (a rollout) can feed its batch-shaped outputs to the train step. Its outputs
were always replicated: on 2 devices the train step then refused them with JAX's raw `ValueError: Sharding passed to
jit does not match ...` (docs/custom_trainer.md, "A different iteration")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs import child_env, xla_flags

TESTS_DIR = str(Path(__file__).resolve().parent)

TWO_DEVICES = """
import json, jax.numpy as jnp
from easytrain import BaseTrainer
from runs import args_for


def new_rows(state, batch):  # a stand-in rollout: new rows of the batch's shape
    return {"input_ids": batch["targets"], "targets": batch["input_ids"], "loss_mask": batch["loss_mask"],
            "first_mask": batch["loss_mask"][:, :1]}


def new_rows_and_summary(state, batch):
    return {**new_rows(state, batch), "first_mask": batch["loss_mask"].mean()}  # a scalar: replicated


class Rollouts(BaseTrainer):
    rollout_fn, batch_outputs = staticmethod(new_rows), True

    def configure_functions(self):
        functions = super().configure_functions()
        self.rollout = self.compile_step(self.rollout_fn, batch_outputs=self.batch_outputs)
        return functions

    def train_iteration(self, state, batch):
        rows = self.rollout(state, batch)
        self.layouts = {name: str(value.sharding.spec) for name, value in rows.items()}
        rows.pop("first_mask")
        return self.functions.train_step(state, rows)  # the train step takes rows split like the batch

    def plan_memory(self, state, batch):
        return None


class NamedRollouts(Rollouts):
    rollout_fn, batch_outputs = staticmethod(new_rows_and_summary), ("input_ids", "targets", "loss_mask")


facts = {}
for kind in (Rollouts, NamedRollouts):
    trainer = kind(args_for("OUT/" + kind.__name__, max_steps=2, data_parallel_size=2, save_strategy="no"))
    logs = trainer.train()
    facts[kind.__name__] = {"steps": int(trainer.state.step), "loss_finite": bool(jnp.isfinite(logs["loss"])),
                            "layouts": trainer.layouts}
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    env = child_env(XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] += os.pathsep + TESTS_DIR
    code = TWO_DEVICES.replace("OUT", str(tmp_path_factory.mktemp("runs")))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_output_split_like_the_batch_feeds_the_train_step_on_two_devices(facts):
    run = facts["Rollouts"]
    assert run["steps"] == 2 and run["loss_finite"]
    assert all(layout == "P(('data', 'fsdp'),)" for layout in run["layouts"].values()), run["layouts"]


def test_named_outputs_split_like_the_batch_and_the_rest_replicated(facts):
    run = facts["NamedRollouts"]
    assert run["steps"] == 2 and run["loss_finite"]
    assert run["layouts"].pop("first_mask") == "P()"
    assert all(layout == "P(('data', 'fsdp'),)" for layout in run["layouts"].values()), run["layouts"]


def test_batch_outputs_not_a_bool_or_names_is_refused_before_set_up(tmp_path):
    from easytrain import BaseTrainer
    from runs import args_for

    trainer = BaseTrainer(args_for(tmp_path, max_steps=1))
    with pytest.raises(TypeError, match=r"batch_outputs must be .* got 'input_ids'.*batch_outputs=\("):
        trainer.compile_step(lambda state, batch: batch, batch_outputs="input_ids")
    assert trainer._model is None  # refused before set-up built anything


def test_names_the_outputs_lack_are_refused_naming_them(tmp_path):
    from easytrain import BaseTrainer
    from runs import args_for

    trainer = BaseTrainer(args_for(tmp_path, max_steps=1))
    step = trainer.compile_step(lambda state, batch: {"rows": batch["input_ids"]}, batch_outputs=("rows", "mask"))
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator()))
    with pytest.raises(TypeError, match=r"batch_outputs names \['mask', 'rows'\].*\['rows'\] \(no \['mask'\]\)"):
        step(trainer.state, batch)
