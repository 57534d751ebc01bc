"""The extension surface methods build on: frozen state, the trainable filter, reducible metrics,
batch layouts, extra compiled functions and the iteration hook."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import BaseTrainer, LossOutput, TrainingArguments, causal_lm_loss
from easytrain.checkpoint import CheckpointManager
from easytrain.frozen import Frozen
from easytrain.losses import model_logits
from easytrain.metrics import Max, Mean, mean_over, merge_all
from runs import StopAt, child_env, logged, xla_flags


def tiny_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=8, eval_batch_size=8,
                  max_steps=4, learning_rate=3e-3, logging_steps=1, eval_strategy="no", save_strategy="no",
                  report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                  max_train_samples=64, max_eval_samples=16, model_config="tiny")
    values.update(overrides)
    return TrainingArguments(**values)


def nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------- frozen state
class AnchoredTrainer(BaseTrainer):
    """Cross-entropy plus a pull towards a frozen copy of the initial model (a reference policy)."""

    checkpoint_reference = False

    def configure_frozen(self):
        return {"reference": Frozen(self.create_module, checkpoint=self.checkpoint_reference)}

    def compute_loss(self, model, batch, rng, train, frozen):
        out = causal_lm_loss(model, batch, rng, train, frozen)
        drift_BTV = model_logits(model, batch) - model_logits(frozen["reference"], batch)
        drift = jnp.sum(jnp.mean(jnp.square(drift_BTV), axis=-1) * batch["loss_mask"])
        return LossOutput(out.loss_sum + drift, out.count, {**out.metrics, "drift": Mean(drift, out.count)})


def test_a_frozen_copy_is_an_argument_stays_bit_identical_and_is_not_duplicated(tmp_path):
    trainer = AnchoredTrainer(tiny_args(tmp_path))
    state = trainer.state
    reference = jax.tree.map(np.asarray, state.frozen["reference"])
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state.params)):  # built like the policy
        np.testing.assert_array_equal(a, np.asarray(b))
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    traced = trainer.functions.train_step.trace(state, batch)
    big = [c.shape for c in traced.jaxpr.consts if np.size(c) > 64]
    assert not big, f"large compile-time constants in the step: {big}"
    memory = traced.lower().compile().memory_analysis()
    assert memory.alias_size_in_bytes >= nbytes(state.frozen), "the frozen copy is donated and passed through"
    assert "reference" not in str(jax.tree_util.tree_structure(state.opt_state))
    logs = trainer.train()
    assert logs["drift"] > 0
    for a, b in zip(jax.tree.leaves(trainer.state.frozen["reference"]), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert nbytes(trainer.state.opt_state) < 3 * nbytes(trainer.state.params), "no optimizer state for it"


@pytest.mark.parametrize("checkpointed", [False, True])
def test_frozen_entries_are_rebuilt_or_restored_on_resume_with_an_exact_curve(tmp_path, checkpointed):
    class Trainer(AnchoredTrainer):
        checkpoint_reference = checkpointed

    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight = tiny_args(tmp_path / "straight", **common)
    Trainer(straight).train()
    interrupted = tiny_args(tmp_path / "interrupted", **common)
    Trainer(interrupted, callbacks=[StopAt(2)]).train()
    keys = CheckpointManager(Path(interrupted.output_dir) / "checkpoints").stored_signature(2)
    assert any(key.startswith("frozen.reference.") for key in keys) == checkpointed
    resumed = Trainer(tiny_args(tmp_path / "interrupted", resume_from_checkpoint="latest", **common))
    resumed.train()
    assert logged(interrupted.output_dir) == logged(straight.output_dir)
    assert logged(interrupted.output_dir, "drift") == logged(straight.output_dir, "drift")



@pytest.mark.parametrize("entry", ["module", "state"])
def test_a_frozen_builder_draws_its_layers_stacked_and_holds_the_values_drawn_one_by_one(tmp_path, entry):
    """In the unrolled layout a builder of `create_module` (a reference, an EMA's state) is built with its layers
    as one vmapped layer, an initialisation compiled once whatever the depth, and unstacked outside that program:
    every value equals the build that draws the layers one by one."""
    flags = []  # initialising_module at each call of the builder; the last call draws the values

    class Recording(BaseTrainer):
        def configure_frozen(self):
            def build():
                flags.append(self.initialising_module)
                module = self.create_module()
                return module if entry == "module" else nnx.state(module, nnx.Param)
            return {"copy": Frozen(build, checkpoint=entry == "state")}

    trainer = Recording(tiny_args(tmp_path, max_steps=1, model_config="small"))
    built = jax.tree.map(np.asarray, trainer.state.frozen["copy"])
    assert flags[-1], f"the program that drew the values built the layers one by one: {flags}"
    with nnx.use_eager_sharding(False):
        one_by_one = jax.jit(lambda: nnx.to_pure_dict(nnx.state(trainer.create_module(), nnx.Param)))()
    assert not trainer.initialising_module and len(one_by_one["layers"]) == 4
    assert jax.tree.structure(built) == jax.tree.structure(one_by_one)
    for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(one_by_one)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert trainer.train()["loss"] > 0


# ----------------------------------------------------------------------------- what trains
class FrozenEmbeddings(BaseTrainer):
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed_tokens")))


def test_the_trainable_filter_gives_gradients_and_optimizer_state_to_the_subset_only(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    trainer = FrozenEmbeddings(tiny_args(tmp_path / "straight", **common))
    state = trainer.state
    embedding = np.asarray(state.model_state["embed_tokens"]["embedding"])
    assert "embed_tokens" not in state.params and "embed_tokens" in state.model_state
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
    assert nbytes(moments) == 2 * nbytes(state.params), "Adam's two moments, for trainable weights only"
    before = jax.tree.map(np.asarray, state.params)
    trainer.train()
    np.testing.assert_array_equal(np.asarray(trainer.state.model_state["embed_tokens"]["embedding"]),
                                  embedding)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(trainer.state.params)))
    interrupted = tiny_args(tmp_path / "interrupted", **common)
    FrozenEmbeddings(interrupted, callbacks=[StopAt(2)]).train()
    FrozenEmbeddings(tiny_args(tmp_path / "interrupted", resume_from_checkpoint="latest", **common)).train()
    assert logged(interrupted.output_dir) == logged(tmp_path / "straight" / "run")


# ------------------------------------------------------------------- batch layouts, metrics
class PairedTrainer(BaseTrainer):
    """A paired layout: each row holds a block and its reversal; a per-pair preference-style metric."""

    def collate(self, rows, example_ids):
        single = super().collate(rows, example_ids)
        pair = lambda x: np.stack([x, x[:, ::-1]], axis=1)  # [B, 2, T]
        return {"pair_ids": pair(single["input_ids"]), "pair_targets": pair(single["targets"]),
                "pair_mask": pair(single["loss_mask"]), "example_id": single["example_id"]}

    def count_tokens(self, batch):
        return int(batch["pair_ids"].size)

    def compute_loss(self, model, batch, rng, train, frozen):
        ids_NT = batch["pair_ids"].reshape(-1, batch["pair_ids"].shape[-1])
        logits = model(ids_NT).astype(jnp.float32)
        targets_NT = batch["pair_targets"].reshape(ids_NT.shape)
        logp_NT = jnp.take_along_axis(jax.nn.log_softmax(logits), targets_NT[..., None], axis=-1)[..., 0]
        seq_B2 = jnp.sum(logp_NT * batch["pair_mask"].reshape(ids_NT.shape), axis=-1).reshape(-1, 2)
        margin_B = seq_B2[:, 0] - seq_B2[:, 1]
        valid_B = (jnp.sum(batch["pair_mask"], axis=(1, 2)) > 0).astype(jnp.float32)
        loss_B = -jax.nn.log_sigmoid(margin_B)
        return LossOutput(jnp.sum(loss_B * valid_B), jnp.sum(valid_B),
                          {"margin": mean_over(margin_B, valid_B), "max_margin": Max(jnp.max(margin_B))})


@pytest.mark.parametrize("accumulation", [1, 4])
def test_a_paired_layout_trains_and_its_per_pair_metrics_are_exact(tmp_path, accumulation):
    args = tiny_args(tmp_path / str(accumulation), max_steps=1, gradient_accumulation_steps=accumulation)
    trainer = PairedTrainer(args)
    batch = next(trainer.dataloaders.train.iterator(0))
    assert batch["pair_ids"].shape == (8, 2, 32)
    model = trainer.model
    logits = np.asarray(model(batch["pair_ids"].reshape(16, 32)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token = np.take_along_axis(logp, batch["pair_targets"].reshape(16, 32)[..., None], -1)[..., 0]
    margins = (token * batch["pair_mask"].reshape(16, 32)).sum(-1).reshape(8, 2) @ np.array([1.0, -1.0])
    logs = trainer.train()
    assert logs["margin"] == pytest.approx(margins.mean(), rel=1e-4, abs=1e-4)
    assert logs["max_margin"] == pytest.approx(margins.max(), rel=1e-4, abs=1e-4)
    assert logs["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-margins))), rel=1e-4)


def test_metric_reductions_are_exact_on_a_mesh_with_accumulation():
    """Per-example means equal NumPy's on 1 device and on a (2,2,2) mesh with 4 micro-batches."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    layouts = {"1 device": "1,1,1,1", "(2,2,2) x4": "2,2,2,4"}  # both in one 8-device process
    env = child_env(XLA_FLAGS=xla_flags(8))
    run = subprocess.run([sys.executable, str(root / "tests" / "workers" / "metric_reduction.py"), *layouts.values()],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    results = {name: next(line for line in lines if line["layout"] == layout) for name, layout in layouts.items()}
    assert results["1 device"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert results["(2,2,2) x4"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    for name, result in results.items():
        assert result["per_example"] == pytest.approx(result["numpy_per_example"], rel=1e-5), name
        assert result["max_example"] == pytest.approx(result["numpy_max_example"], rel=1e-5), name
        assert result["loss"] == pytest.approx(result["numpy_per_token"], rel=1e-5), name
        # the two means differ on these ragged masks, so dividing by the wrong count would fail
        assert abs(result["numpy_per_example"] - result["numpy_per_token"]) > 1e-2


class NamedMetric(BaseTrainer):
    """The causal LM loss plus one metric under a name given by the test."""

    metric_name = "drift"

    def compute_loss(self, model, batch, rng, train, frozen):
        out = causal_lm_loss(model, batch, rng, train, frozen)
        return out._replace(metrics={**out.metrics, self.metric_name: Mean(out.loss_sum, out.count)})


@pytest.mark.parametrize("name", ["grad_norm", "epoch", "samples_per_second", "step", "split", "time"])
def test_a_loss_metric_may_not_take_a_name_the_log_record_holds(tmp_path, name):
    """A metric named like a field of the log record would be overwritten by it, or overwrite the record's own key."""
    trainer = type("Clash", (NamedMetric,), {"metric_name": name})(tiny_args(tmp_path))
    with pytest.raises(ValueError, match=rf"'{name}'.*rename"):
        trainer.train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not logged(tmp_path / "run")


def test_every_field_of_a_train_log_record_is_reserved(tmp_path):
    """The reserved names are the record's own: a field the loop starts logging must be added to them."""
    from easytrain.steps import RESERVED_METRIC_NAMES

    NamedMetric(tiny_args(tmp_path, max_steps=2)).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fields = set().union(*(record for record in records if record["split"] == "train"))
    assert "compile_seconds" in fields and "step_time" in fields
    assert fields - {"drift", "num_tokens", "accuracy"} <= set(RESERVED_METRIC_NAMES)


class MisshapenLoss(BaseTrainer):
    """A loss that returns what the test says instead of a well-formed `LossOutput`."""

    def compute_loss(self, model, batch, rng, train, frozen):
        out = causal_lm_loss(model, batch, rng, train, frozen)
        return {"tuple": lambda: (out.loss_sum, out.count), "scalar": lambda: out.loss_sum / out.count,
                "per-token": lambda: out._replace(loss_sum=out.loss_sum * batch["loss_mask"]),
                "vector metric": lambda: out._replace(metrics={"row_max": Max(jnp.max(batch["loss_mask"], -1))}),
                "python numbers": lambda: out._replace(metrics={"calls": Mean(1.0, 1), "most": Max(3)}),
                }[self.mistake]()


@pytest.mark.parametrize("mistake, message", [
    ("tuple", r"compute_loss returned a tuple.*LossOutput\(loss_sum, count"),
    ("scalar", r"compute_loss returned an array of shape \(\).*LossOutput\(loss_sum, count"),
    ("per-token", r"loss_sum has shape \(8, 32\).*sum"),
    ("vector metric", r"metric 'row_max' has shape \(8,\).*scalar"),
])
def test_a_misshapen_loss_output_is_refused_before_the_first_step_by_name(tmp_path, mistake, message):
    trainer = type("Mistaken", (MisshapenLoss,), {"mistake": mistake})(tiny_args(tmp_path))
    with pytest.raises((TypeError, ValueError), match=message):
        trainer.train()


def test_metrics_given_as_python_numbers_reduce(tmp_path):
    trainer = type("Numbers", (MisshapenLoss,), {"mistake": "python numbers"})(tiny_args(tmp_path, max_steps=2,
                                                                                          logging_steps=2))
    logs = trainer.train()
    assert logs["calls"] == 1.0 and logs["most"] == 3.0


class SplitsInOne(BaseTrainer):
    """`prepare_datasets` returning a `DatasetDict` as the train rows: a common slip."""

    def prepare_datasets(self):
        import datasets

        train, _ = super().prepare_datasets()
        return datasets.DatasetDict(train=datasets.Dataset.from_dict(dict(train[:])), test=train), None


def test_a_dataset_dict_from_prepare_datasets_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"prepare_datasets.*DatasetDict.*\['train', 'test'\].*\(train, eval\)"):
        SplitsInOne(tiny_args(tmp_path)).train()


class Tagged(BaseTrainer):
    """Batches with a string field the step cannot take."""

    def collate(self, rows, example_ids):
        return {**super().collate(rows, example_ids), "tag": np.array(["row"] * len(example_ids))}


def test_a_string_field_in_the_batch_names_host_only_fields(tmp_path):
    with pytest.raises(TypeError, match=r"batch field 'tag'.*<U3.*host_only_fields"):
        Tagged(tiny_args(tmp_path)).train()
    assert Tagged(tiny_args(tmp_path / "b")).__class__.host_only_fields  # the documented way out exists
    kept = type("KeptOnHost", (Tagged,), {"host_only_fields": ("example_id", "tag")})(tiny_args(tmp_path / "c"))
    assert np.isfinite(kept.train()["loss"])


def test_compile_step_sets_the_trainer_up_first(tmp_path):
    trainer = BaseTrainer(tiny_args(tmp_path))
    total = trainer.compile_step(lambda state, batch: jnp.sum(batch["input_ids"]))
    assert int(total(trainer.state, trainer.to_global({"input_ids": np.ones((8, 32), np.int32)}))) == 8 * 32


# ------------------------------------------------------------- compiled helpers and iteration
class ScoringTrainer(BaseTrainer):
    """An extra compiled pass in one line: summed log-likelihood of a batch under the current state."""

    def configure_functions(self):
        functions = super().configure_functions()
        self.score = self.compile_step(lambda state, batch: causal_lm_loss(
            state.model(train=False), batch, None, False).loss_sum)
        return functions


def test_compile_step_compiles_any_pure_function_of_state_and_batch(tmp_path):
    trainer = ScoringTrainer(tiny_args(tmp_path))
    batch = trainer.to_global(next(iter(trainer.dataloaders.eval)))
    score = trainer.score(trainer.state, batch)
    expected = trainer.functions.eval_step(trainer.state, batch)["loss"].total
    assert float(score) == pytest.approx(float(expected), rel=1e-6)
    assert score.sharding.is_fully_replicated
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(trainer.state.params)), "nothing donated"


class TwoUpdatesPerBatch(BaseTrainer):
    def train_iteration(self, state, batch):
        state, first = self.functions.train_step(state, batch)
        state, second = self.functions.train_step(state, batch)
        return state, merge_all(first, second)


def test_train_iteration_can_run_several_updates_per_batch(tmp_path):
    args = tiny_args(tmp_path, max_steps=3)
    trainer = TwoUpdatesPerBatch(args)
    trainer.train()
    assert int(trainer.state.step) == 6
    assert sorted(logged(args.output_dir)) == [1, 2, 3]


class OwnRows(BaseTrainer):
    """Rows of its own making (here: the default ones, renamed), and no `prepare_eval_dataset`."""

    def prepare_datasets(self):
        return super().prepare_datasets()


def test_evaluate_on_a_dataset_asks_a_trainer_with_its_own_rows_for_prepare_eval_dataset(tmp_path):
    import datasets

    trainer = OwnRows(tiny_args(tmp_path))
    with pytest.raises(NotImplementedError, match=r"OwnRows overrides prepare_datasets.*override "
                                                  r"prepare_eval_dataset\(dataset\)"):
        trainer.evaluate(datasets.Dataset.from_dict({"x": [[0.5, 1.0]], "y": [1]}))


def test_an_unexportable_model_is_refused_before_training(tmp_path):
    from easytrain import ArgumentError

    class NoConfig(FrozenEmbeddings):
        def prepare_datasets(self):
            rows = super().prepare_datasets()
            self.model_config = None  # a module with no Hugging Face config
            return rows

        def create_module(self):
            from easytrain.models.presets import llama_config
            config = llama_config("tiny", vocab_size=len(self.tokenizer))
            from easytrain.models import LlamaForCausalLM
            return LlamaForCausalLM(config, rngs=nnx.Rngs(0))

    trainer = NoConfig(tiny_args(tmp_path, save_pretrained_at_end=True))
    with pytest.raises(ArgumentError, match="save_pretrained_at_end.*no Hugging Face config"):
        trainer.train()
    assert not (Path(tmp_path) / "run" / "metrics.jsonl").exists(), "refused before any step"


def test_an_optimizer_whose_init_reads_the_parameters_places_its_state(tmp_path):
    """Per-group learning rates with optax.multi_transform: its state follows the parameters' shardings."""
    import optax

    class GroupedRates(BaseTrainer):
        def configure_optimizer(self, schedule):
            labels = lambda params: {name: "embed" if name == "embed_tokens" else "rest" for name in params}
            return optax.multi_transform({"embed": optax.adam(1e-4), "rest": optax.adam(schedule)}, labels)

    trainer = GroupedRates(tiny_args(tmp_path, max_steps=2))
    logs = trainer.train()
    assert np.isfinite(logs["loss"])
    shardings = jax.tree.leaves(trainer.state_shardings.opt_state)
    assert len(shardings) == len(jax.tree.leaves(trainer.state.opt_state))
