"""A fixed frozen entry (`Frozen(value, checkpoint=False)`: a teacher, a reference) is rebuilt from its source on
resume, so its digests go into run_info (`frozen_fingerprints`) and a resume whose entry holds other values is refused
by name before any array of the checkpoint is read; an entry of the same values resumes, whatever the mesh or the
`scan_layers` layout, and so do older checkpoints and entries declared `fingerprint=False`."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from runs import args_for, child_env, xla_flags

from easytrain import ArgumentError, BaseTrainer
from easytrain.checkpoint import CheckpointManager
from easytrain.frozen import Frozen, digests_as_recorded
from easytrain.integrity import fingerprint
from easytrain.models.scan import STACKED
from easytrain.models import from_pretrained, init_model, save_pretrained
from model_configs import tiny_config

TESTS = Path(__file__).resolve().parent


def export_teacher(folder: Path, seed: int) -> Path:
    """A tiny exported model: the teacher a run reads from `folder` (another `seed`: the folder overwritten)."""
    save_pretrained(folder, init_model(tiny_config(), seed=seed), tiny_config())
    return folder


def write_pytree(path: Path, flip: bool = False, without: str = "", extra: bool = False) -> Path:
    """Two arrays saved as `.npz`; `flip` changes one element of `w` only, `without` leaves one out and `extra`
    adds a third (`c`): the teacher's source with a leaf gone or new."""
    w = np.linspace(-1, 1, 96, dtype=np.float32).reshape(8, 12)
    if flip:
        w[3, 4] = 7.0
    arrays = {"w": w, "b": np.arange(12, dtype=np.float32)} | ({"c": np.ones(3, np.float32)} if extra else {})
    np.savez(path, **{name: value for name, value in arrays.items() if name != without})
    return path


class FolderTeacher(BaseTrainer):
    """A tiny LM run carrying a teacher read from an exported folder in the run's `scan_layers` layout."""
    source: Path | None = None

    def configure_frozen(self):
        teacher = from_pretrained(self.source, mesh=self.mesh, rules=self.partition_rules,
                                  scan_layers=self.arguments.scan_layers)
        return {"teacher": Frozen(teacher, checkpoint=False, copy=False)}


class PytreeTeacher(BaseTrainer):
    """A teacher that is a pytree of the arrays a `.npz` holds, `w` in bfloat16."""
    source: Path | None = None
    options: dict = {}

    def configure_frozen(self):
        arrays = np.load(self.source)
        value = {name: jnp.asarray(arrays[name], jnp.bfloat16) if name == "w" else arrays[name]
                 for name in arrays.files}
        return {"teacher": Frozen(value, checkpoint=False, **self.options)}


class RandomReference(FolderTeacher):
    """Also a freshly drawn reference (`create_module`, the trainer's seed): the same values at every start, on any
    mesh, and in either `scan_layers` layout (stacked under it)."""

    def configure_frozen(self):
        return {**super().configure_frozen(), "reference": Frozen(self.create_module)}


class OlderRun(PytreeTeacher):
    """Writes run_info as an easytrain before `frozen_fingerprints` did."""

    def run_info(self):
        return {key: value for key, value in super().run_info().items() if key != "frozen_fingerprints"}


def reading_restores(monkeypatch) -> list[int]:
    """The steps whose arrays `CheckpointManager.restore` read from now on."""
    calls, original = [], CheckpointManager.restore
    monkeypatch.setattr(CheckpointManager, "restore",
                        lambda self, step, *a, **k: calls.append(step) or original(self, step, *a, **k))
    return calls


def trained(trainer_class, output_dir: Path, **overrides) -> BaseTrainer:
    trainer = trainer_class(args_for(output_dir, max_steps=2, **overrides))
    trainer.train()
    return trainer


def resumed(trainer_class, output_dir: Path, **overrides) -> BaseTrainer:
    trainer = trainer_class(args_for(output_dir, resume_from_checkpoint="latest", **overrides))
    trainer.train()
    return trainer


def recorded(output_dir: Path, step: int = 2) -> dict:
    with CheckpointManager(output_dir / "checkpoints", read_only=True) as manager:
        return manager.read_run_info(step).get("frozen_fingerprints")


def test_a_teacher_folder_overwritten_before_the_resume_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(FolderTeacher, "source", export_teacher(tmp_path / "teacher", seed=1))
    trained(FolderTeacher, tmp_path / "run")
    export_teacher(tmp_path / "teacher", seed=2)  # another teacher written over the run's
    restores = reading_restores(monkeypatch)
    with pytest.raises(ArgumentError, match=r"frozen entry 'teacher'.*16 tensor\(s\) differ: embed_tokens"):
        resumed(FolderTeacher, tmp_path / "run")
    assert restores == [], "refused before any array of the checkpoint is read"
    export_teacher(tmp_path / "teacher", seed=1)  # the source restored: the run continues
    assert resumed(FolderTeacher, tmp_path / "run").state.step == 4


def test_a_pytree_teacher_names_the_one_tensor_that_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(PytreeTeacher, "source", write_pytree(tmp_path / "teacher.npz"))
    trained(PytreeTeacher, tmp_path / "run")
    digests = recorded(tmp_path / "run")["teacher"]
    assert sorted(digests) == ["b", "w"], "both leaves recorded, the bfloat16 one too"
    write_pytree(tmp_path / "teacher.npz", flip=True)
    with pytest.raises(ArgumentError, match=r"frozen entry 'teacher'.*1 tensor\(s\) differ: w\b") as refused:
        resumed(PytreeTeacher, tmp_path / "run")
    assert "fingerprint=False" in str(refused.value) and "output_dir" in str(refused.value), "the fixes are named"
    write_pytree(tmp_path / "teacher.npz", extra=True)  # the same values, and a leaf the run never had
    with pytest.raises(ArgumentError, match=r"frozen entry 'teacher'.*1 tensor\(s\) are new: c\b"):
        resumed(PytreeTeacher, tmp_path / "run")
    write_pytree(tmp_path / "teacher.npz", without="b")  # the same values, one leaf of the run's gone
    with pytest.raises(ArgumentError, match=r"frozen entry 'teacher'.*1 tensor\(s\) the checkpoint's run had are "
                                            r"gone: b\b"):
        resumed(PytreeTeacher, tmp_path / "run")


def test_an_entry_declared_without_fingerprint_and_an_older_checkpoint_resume_as_before(tmp_path, monkeypatch):
    monkeypatch.setattr(PytreeTeacher, "source", write_pytree(tmp_path / "teacher.npz"))
    monkeypatch.setattr(PytreeTeacher, "options", {"fingerprint": False})
    trained(PytreeTeacher, tmp_path / "opted_out")
    assert recorded(tmp_path / "opted_out") is None, "nothing recorded for it"
    trained(OlderRun, tmp_path / "older")
    write_pytree(tmp_path / "teacher.npz", flip=True)
    assert resumed(PytreeTeacher, tmp_path / "opted_out").state.step == 4
    monkeypatch.setattr(PytreeTeacher, "options", {})
    assert resumed(PytreeTeacher, tmp_path / "older").state.step == 4, "no record: not compared"
    assert sorted(recorded(tmp_path / "older", step=4)["teacher"]) == ["b", "w"], "recorded from then on"


def test_the_same_entries_resume_in_the_other_scan_layers_layout_and_other_ones_do_not(tmp_path, monkeypatch):
    monkeypatch.setattr(FolderTeacher, "source", export_teacher(tmp_path / "teacher", seed=1))
    trained(RandomReference, tmp_path / "run", scan_layers=False)
    names = recorded(tmp_path / "run")
    assert any(".0." in path for path in names["reference"]) and not any(STACKED in path for path in names["teacher"])
    export_teacher(tmp_path / "teacher", seed=2)
    with pytest.raises(ArgumentError, match=r"frozen entry 'teacher'.*tensor\(s\) differ: embed_tokens"):
        resumed(RandomReference, tmp_path / "run", scan_layers=True)
    export_teacher(tmp_path / "teacher", seed=1)
    assert resumed(RandomReference, tmp_path / "run", scan_layers=True).state.step == 4, "stacked now, the same values"


def test_a_fresh_random_reference_drawn_on_two_devices_resumes_on_one(tmp_path, monkeypatch):
    monkeypatch.setattr(FolderTeacher, "source", export_teacher(tmp_path / "teacher", seed=1))
    script = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
              "import test_frozen_fingerprint as t; t.FolderTeacher.source = Path(sys.argv[3]); import jax; "
              "assert jax.device_count() == 2; "
              "t.trained(t.RandomReference, Path(sys.argv[2]), fsdp_size=2)")  # the weights split across both
    run = subprocess.run([sys.executable, "-c", script, str(TESTS), str(tmp_path / "run"), str(tmp_path / "teacher")],
                         env=child_env(XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert recorded(tmp_path / "run")["reference"], "drawn on a mesh of two devices, recorded"
    assert resumed(RandomReference, tmp_path / "run").state.step == 4, "the same values on one device"


def test_digests_follow_the_recorded_layout_both_ways():
    layers = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    apart = {"layers": {0: {"w": jnp.asarray(layers[0])}, 1: {"w": jnp.asarray(layers[1])}}}
    stacked = {"layers": {STACKED: {"w": jnp.asarray(layers)}}}
    digests = {layout: fingerprint(values) for layout, values in (("apart", apart), ("stacked", stacked))}
    assert digests_as_recorded(apart, digests["apart"], digests["stacked"]) == digests["stacked"]
    assert digests_as_recorded(stacked, digests["stacked"], digests["apart"]) == digests["apart"]
    assert digests_as_recorded(apart, digests["apart"], digests["apart"]) == digests["apart"]


def test_the_trainer_keeps_no_copy_of_a_frozen_entrys_original_after_set_up(tmp_path):
    """The digests are kept, not the plan: keeping it held every copied entry's original (a second teacher on the
    devices for the whole run; 21.2 against 13.4 MiB live for a 7.8 MiB teacher)."""
    import gc
    import weakref

    given = [init_model(tiny_config(), seed=1)]
    original = weakref.ref(given[0])

    class Teacher(BaseTrainer):
        def configure_frozen(self):
            return {"teacher": Frozen(given.pop())}  # copy=True: the module given is copied onto the mesh

    trainer = Teacher(args_for(tmp_path, max_steps=1, save_strategy="no"))
    trainer.train()
    gc.collect()
    assert "teacher" in trainer.run_info()["frozen_fingerprints"]
    assert original() is None, "the trainer still holds the teacher it copied"
