"""docs/custom_trainer.md runs as written: its ```python blocks execute top to bottom in one namespace
(the page's stated convention), every trainer it defines trains at tiny size, and each example does
what the page says it does."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from doc_snippets import python_blocks, run_page

from easytrain import BaseTrainer, Callback

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_trainer.md"


class Recorder(Callback):
    """Every training log of one run, by step."""

    def __init__(self):
        self.logs: dict[int, dict[str, float]] = {}

    def on_log(self, trainer, step, logs):
        self.logs[step] = dict(logs)


class Page:
    def __init__(self, namespace, runs, workdir):
        self.namespace, self.runs, self.workdir = namespace, runs, workdir

    def __getitem__(self, name):
        return self.namespace[name]

    def run(self, class_name):
        """(trainer, per-step logs) of the page's run of `class_name`."""
        matches = [(trainer, recorder.logs) for trainer, recorder in self.runs if type(trainer).__name__ == class_name]
        assert len(matches) == 1, f"the page trains {class_name} {len(matches)} times"
        return matches[0]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module only, starting empty: the page's trainers compile the same
    initialisation and steps many times over, and each distinct program is still compiled once here."""
    from jax.experimental.compilation_cache import compilation_cache

    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
                "jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": -1}
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def page(tmp_path_factory, compilation_cache):
    """Run the page once, in a scratch directory (its examples write runs/<name>), recording each run."""
    workdir = tmp_path_factory.mktemp("custom_trainer_doc")
    runs = []
    train = BaseTrainer.train

    def recorded_train(self):
        recorder = Recorder()
        self.callbacks.add(recorder)
        runs.append((self, recorder))
        return train(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setattr(BaseTrainer, "train", recorded_train)
        namespace = run_page(DOC)
    return Page(namespace, runs, workdir)


# ------------------------------------------------------------------------------------ the page itself
def test_block_line_numbers_point_into_the_page():
    lines = DOC.read_text().splitlines()
    blocks = python_blocks(DOC)
    assert len(blocks) >= 10
    for block in blocks:
        assert lines[block.line - 2] == "```python"
        assert lines[block.line - 1] == block.source.splitlines()[0]


def test_the_table_names_hooks_that_exist():
    table = DOC.read_text().split("## What to override for what")[1].split("\n## ")[0]
    hooks = ["compute_loss", "collate", "count_tokens", "count_token_slots", "host_only_fields", "prepare_datasets",
             "configure_frozen", "model_flops", "trainable", "create_module", "save_pretrained", "compile_step",
             "configure_functions", "train_function", "train_iteration", "configure_optimizer", "configure_schedule",
             "configure_mesh", "partition_rules"]
    for hook in hooks:
        assert f"`{hook}" in table, hook
        assert hasattr(BaseTrainer, hook), f"the page documents BaseTrainer.{hook}, which does not exist"
    assert "tests/test_docs_custom_trainer.py" in DOC.read_text(), "the page states how its blocks are run"


def test_every_trainer_the_page_defines_trains(page):
    defined = {name for name, value in page.namespace.items()
               if isinstance(value, type) and issubclass(value, BaseTrainer) and value is not BaseTrainer}
    trained = {type(trainer).__name__ for trainer, _ in page.runs}
    assert defined <= trained, f"defined but never trained: {defined - trained}"
    for trainer, recorder in page.runs:
        assert recorder.logs, type(trainer).__name__
        last = recorder.logs[max(recorder.logs)]
        assert math.isfinite(last["loss"]) and last["skipped_steps"] == 0, type(trainer).__name__
        assert int(trainer.state.step) > 0


# ------------------------------------------------------------------------------------ each section
def test_the_loss_example_logs_metrics_of_each_kind(page):
    _, logs = page.run("LabelSmoothingTrainer")
    for step in (1, 2):
        assert logs[step]["num_tokens"] == 8 * 32, "a Sum over the batch's supervised tokens"
        assert 0 <= logs[step]["accuracy"] <= 1
        assert math.isfinite(logs[step]["max_logit"]) and logs[step]["nll"] > 0
    assert logs[1]["nll"] == pytest.approx(math.log(18), rel=0.15), "near-uniform predictions at initialisation"


def test_the_pair_layout_reaches_the_loss_and_padded_eval_rows_weigh_nothing(page):
    trainer, logs = page.run("PreferenceTrainer")
    batch = next(trainer.dataloaders.train.iterator(0))
    assert batch["pair_inputs"].shape == (8, 2, 32) and set(batch["pair_weight"]) == {1.0}
    assert 0 <= logs[2]["pair_accuracy"] <= 1
    results = {}
    for eval_batch_size in (16, 12):  # 16 eval rows: one full batch, or a batch and one with 8 padding rows
        fresh = page["PreferenceTrainer"](page["tiny_arguments"](str(page.workdir / f"eval{eval_batch_size}"),
                                                                 eval_batch_size=eval_batch_size))
        fresh.setup()
        fresh.evaluators.clear()  # only the loss's own metrics
        results[eval_batch_size] = fresh.evaluate()
    assert results[12]["eval_loss"] == pytest.approx(results[16]["eval_loss"], rel=1e-5)
    assert results[12]["eval_pair_accuracy"] == pytest.approx(results[16]["eval_pair_accuracy"], abs=1e-6)


def test_dpo_reads_its_frozen_reference_in_the_loss(page):
    trainer, logs = page.run("DPOTrainer")
    assert logs[1]["loss"] == pytest.approx(math.log(2), abs=1e-4), "policy == reference at the first step"
    assert logs[1]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert abs(logs[2]["reward_margin"]) > 1e-3, "after one update the policy and the reference differ"
    reference = jax.tree.leaves(trainer.state.frozen["reference"])
    params = jax.tree.leaves(trainer.state.params)
    assert len(reference) == len(params)
    assert any(not np.array_equal(a, b) for a, b in zip(reference, params))
    assert "reference" not in trainer.state.checkpointed().frozen, "checkpoint=False: rebuilt on resume"


def test_dpo_loads_its_reference_from_a_pretrained_policy(page, tmp_path):
    pretrained, _ = page.run("LabelSmoothingTrainer")  # a trained language model, exported in HF layout
    pretrained.save_pretrained(tmp_path / "pretrained")
    dpo = page["DPOTrainer"](page["tiny_arguments"](str(tmp_path / "dpo"),
                                                    model_name_or_path=str(tmp_path / "pretrained")))
    expected = jax.tree.leaves(pretrained.state.params)
    for tree in (dpo.state.frozen["reference"], dpo.state.params):
        leaves = jax.tree.leaves(tree)
        assert len(leaves) == len(expected)
        for a, b in zip(leaves, expected):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_a_resume_under_another_teacher_is_refused_by_name(page):
    trainer, _ = page.run("Distillation")
    assert int(trainer.state.step) == 2 and trainer.teacher_path == "runs/teacher_a"
    assert "teacher_path: checkpoint 'runs/teacher_a' vs now 'runs/teacher_b'" in page["refusal"]


def test_the_trainable_filter_leaves_the_embeddings_untouched(page):
    trainer, _ = page.run("FrozenEmbeddingsTrainer")
    assert "embed_tokens" not in trainer.state.params and "embed_tokens" in trainer.state.model_state
    initial, _ = page.run("DPOTrainer")  # its reference is the seed's initial model, the same architecture
    np.testing.assert_array_equal(np.asarray(trainer.state.model_state["embed_tokens"]["embedding"]),
                                  np.asarray(initial.state.frozen["reference"]["embed_tokens"]["embedding"]))


def test_the_circle_classifier_exports_and_its_padded_evaluation_is_exact(page):
    trainer, _ = page.run("CircleTrainer")
    exported = np.load(page.workdir / "runs" / "circles" / "final_model" / "params.npz")
    assert sorted(exported) == ["hidden.bias", "hidden.kernel", "out.bias", "out.kernel"]
    np.testing.assert_array_equal(exported["out.kernel"], np.asarray(trainer.state.params["out"]["kernel"]))
    points = page["circle_points"](60, seed=1)
    logits = np.asarray(trainer.state.model(train=False)(points["x"]))
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == points["label"]), abs=1e-6)
    assert "tokens_per_second" not in trainer.loop.last_logs, "no input_ids: no token count"


def test_stacked_blocks_compute_what_the_loop_of_blocks_does(page):
    trainer, _ = page.run("DeepCircleTrainer")
    assert trainer.state.params["blocks"]["stacked"]["linear"]["kernel"].shape == (8, 64, 64)
    looped, scanned = (page["DeepMLP"](depth=3, scan=scan, rngs=nnx.Rngs(0)) for scan in (False, True))
    points = page["circle_points"](16, seed=2)["x"]
    np.testing.assert_allclose(np.asarray(scanned(points)), np.asarray(looped(points)), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(looped.blocks[1].linear.kernel[...])).max() > 0


def test_compile_step_scores_every_eval_row(page):
    trainer, _ = page.run("FrozenEmbeddingsTrainer")
    scores, batch = page["scores"], page["eval_batch"]
    assert scores.shape == (16,) and scores.sharding.is_fully_replicated
    total = trainer.functions.eval_step(trainer.state, trainer.to_global(batch))["loss"].total
    assert float(np.sum(scores)) == pytest.approx(-float(total), rel=1e-5)


def test_the_ema_starts_at_the_first_update_and_is_updated_every_step_and_checkpointed(page):
    """The average starts from the trained weights, not the random ones the builder draws for its shape (a run from
    `model_name_or_path` would otherwise average toward its checkpoint from noise)."""
    trainer, logs = page.run("EMATrainer")
    assert logs[1]["ema_distance"] == 0 and logs[2]["ema_distance"] > 0
    ema = trainer.state.frozen["ema"]
    assert jax.tree.structure(ema) == jax.tree.structure(trainer.state.params)
    assert "ema" in trainer.state.checkpointed().frozen
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(trainer.state.params))
                   if np.ndim(a) > 1)


def test_two_updates_per_batch_keep_a_live_schedule(page):
    trainer, logs = page.run("TwoUpdatesPerBatch")
    assert int(trainer.state.step) == 4 and sorted(logs) == [1, 2]
    assert logs[2]["learning_rate"] > 0, "the schedule spans every update, not every batch"


def test_the_tuned_optimizer_and_schedule_are_used(page):
    trainer, logs = page.run("TunedTrainer")
    assert logs[1]["learning_rate"] == 0.0, "the page's warmup starts at 0"
    assert logs[2]["learning_rate"] == pytest.approx(trainer.arguments.learning_rate, rel=1e-6), "then peaks"
    assert logs[2]["learning_rate"] == pytest.approx(float(trainer.scheduler(1)), rel=1e-6)


def test_the_callback_stops_training_and_keeps_its_history(page):
    stopper = page["stopper"]
    trainer, logs = page.run("BaseTrainer")
    # on_log(1) runs once step 2 is dispatched: the stop takes effect after that step in flight
    assert int(trainer.state.step) == 2 and sorted(logs) == [1, 2]
    assert stopper.history == [[1, logs[1]["loss"]], [2, logs[2]["loss"]]]
    assert trainer.callbacks.state_dict() == {"0:StopAtLoss": {"history": stopper.history}}
