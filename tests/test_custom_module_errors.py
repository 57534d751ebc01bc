"""What a trainer for a custom (non-language-model) module is told when it gets a hook wrong: each mistake is
named, with its fix, while the trainer is set up (before any step), and defaults that do not fit such a module
are left out or warned about instead of failing or silently not applying."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytrain import BaseTrainer, LossOutput, TrainingArguments, placement, sharding
from easytrain.data import DataError
from easytrain.eval_metrics import Predictions
from easytrain.frozen import Frozen
from easytrain.metrics import Mean, mean_over

FEATURES, CLASSES = 5, 3


def blobs(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count).astype(np.int32)
    centers = np.random.default_rng(123).normal(0, 2, (CLASSES, FEATURES))
    return {"x": (centers[labels] + rng.normal(0, 1, (count, FEATURES))).astype(np.float32), "label": labels}


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32, hidden_axis: str = "mlp"):
        kernel = lambda axes: nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)
        self.l1 = nnx.Linear(FEATURES, 8, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             kernel_init=kernel((None, hidden_axis)))
        self.l2 = nnx.Linear(8, CLASSES, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def nll(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[:, None], axis=-1)[:, 0]


class Classifier(BaseTrainer):
    """A classifier of the shape docs/custom_trainer.md describes; each test overrides one hook wrongly."""

    def prepare_datasets(self):
        return blobs(32, 1), blobs(16, 2)

    def collate(self, rows, example_ids):
        return {"x": np.asarray(rows["x"]), "label": np.asarray(rows["label"]),
                "weight": (example_ids >= 0).astype(np.float32), "example_id": example_ids}

    def create_module(self):
        return MLP(nnx.Rngs(self.arguments.seed))

    def configure_optimizer(self, schedule):
        return optax.sgd(schedule)

    def compute_loss(self, model, batch, rng, train, frozen):
        logits, weights = model(batch["x"]), batch["weight"]
        return LossOutput(jnp.sum(nll(logits, batch["label"]) * weights), jnp.sum(weights),
                          {"accuracy": mean_over(jnp.argmax(logits, -1) == batch["label"], weights)},
                          predictions=Predictions(logits, batch["label"], weights))


def arguments(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), train_batch_size=8, eval_batch_size=8, max_steps=2,
                  logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                  disable_progress_bar=True, save_pretrained_at_end=False, learning_rate=0.05, warmup_steps=0)
    return TrainingArguments(**{**values, **overrides})


def with_hook(name, hook):
    return type("Trainer", (Classifier,), {name: hook})


@pytest.mark.parametrize("returned, said", [
    ({"per_row": lambda p: Mean(p.weights, jnp.ones_like(p.weights))}, r"'per_row'.*shape \(8,\).*scalar"),
    ({"sum_w": lambda p: jnp.sum(p.weights)}, r"'sum_w' is a bare array of shape \(\).*Mean\(total, count\).*"
                                              r"eval batch"),
])
def test_compute_metrics_values_that_cannot_merge_are_refused_at_setup(tmp_path, returned, said) -> None:
    trainer = with_hook("compute_metrics", lambda self, p, b: {name: f(p) for name, f in returned.items()})(
        arguments(tmp_path))
    with pytest.raises((TypeError, ValueError), match=said):
        trainer.setup()


def test_a_subclass_that_keeps_the_language_model_create_module_is_told_to_override_it(tmp_path) -> None:
    trainer = with_hook("create_module", BaseTrainer.create_module)(arguments(tmp_path))
    with pytest.raises(NotImplementedError, match=r"override create_module.*model="):
        trainer.setup()


def test_the_default_loss_on_other_batches_names_its_fields_and_the_fix(tmp_path) -> None:
    trainer = with_hook("compute_loss", BaseTrainer.compute_loss)(arguments(tmp_path))
    with pytest.raises(ValueError, match=r"causal-LM loss.*'targets'.*label, weight, x.*override compute_loss"):
        trainer.setup()


def test_loss_metrics_that_are_not_a_mapping_are_named(tmp_path) -> None:
    loss = lambda self, m, b, r, t, f: LossOutput(jnp.sum(nll(m(b["x"]), b["label"])), 8.0, [1.0])
    with pytest.raises(TypeError, match=r"compute_loss's metrics is a list.*dict"):
        with_hook("compute_loss", loss)(arguments(tmp_path)).setup()


def test_a_collate_returning_lists_is_named_with_its_fix(tmp_path) -> None:
    collate = lambda self, rows, ids: {"x": rows["x"].tolist(), "label": rows["label"].tolist(),
                                       "weight": [1.0] * len(ids)}
    with pytest.raises(TypeError, match=r"collate returned field 'x' as a list.*numpy array"):
        with_hook("collate", collate)(arguments(tmp_path)).setup()


def test_a_module_built_from_rngs_made_outside_create_module_is_told_where_to_make_them(tmp_path) -> None:
    rngs = nnx.Rngs(0)
    trainer = with_hook("create_module", lambda self: MLP(rngs))(arguments(tmp_path))
    with pytest.raises(TypeError, match=r"nnx.Rngs inside create_module"):
        trainer.setup()


def test_default_eval_metrics_leave_a_name_the_loss_reports_to_the_loss(tmp_path) -> None:
    metrics = Classifier(arguments(tmp_path)).evaluate()
    assert set(metrics) == {"eval_loss", "eval_accuracy", "eval_perplexity"}


def test_asked_for_eval_metrics_that_the_loss_reports_too_name_the_fixes(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'accuracy'.*eval_metrics=\['perplexity'\].*drop"):
        Classifier(arguments(tmp_path, eval_metrics=["accuracy", "perplexity"])).setup()


def test_a_module_that_ignores_param_dtype_is_warned_about(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        Classifier(arguments(tmp_path, dtype="bfloat16", param_dtype="bfloat16")).setup()
    warned = [r.getMessage() for r in caplog.records if "param_dtype is" in r.getMessage()]
    assert len(warned) == 1 and "l1.kernel" in warned[0] and "param_dtype=self.param_dtype" in warned[0], warned


def test_a_module_that_honours_param_dtype_is_not_warned_about(tmp_path, caplog) -> None:
    honours = with_hook("create_module", lambda self: MLP(nnx.Rngs(0), self.dtype, self.param_dtype))
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer = honours(arguments(tmp_path, dtype="bfloat16", param_dtype="bfloat16"))
        trainer.setup()
    assert {leaf.dtype for leaf in jax.tree.leaves(trainer.state.params)} == {jnp.dtype("bfloat16")}
    assert not [r for r in caplog.records if "param_dtype is" in r.getMessage()]


def test_an_unknown_logical_axis_name_is_warned_about_once(caplog) -> None:
    module = placement.abstract_module(lambda: MLP(nnx.Rngs(0), hidden_axis="hiden"))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        sharding.param_shardings(nnx.state(module), mesh)
        sharding.param_shardings(nnx.state(module), mesh)
    warned = [r.getMessage() for r in caplog.records if "'hiden'" in r.getMessage()]
    assert len(warned) == 1 and "l1" in warned[0] and "'mlp'" in warned[0], warned


def test_logical_names_the_rules_map_to_none_are_not_warned_about(caplog) -> None:
    module = placement.abstract_module(lambda: MLP(nnx.Rngs(0)))
    rules = (*sharding.DEFAULT_RULES, ("unsharded_hidden", None))
    module_none = placement.abstract_module(lambda: MLP(nnx.Rngs(0), hidden_axis="unsharded_hidden"))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        sharding.param_shardings(nnx.state(module), mesh, rules)
        sharding.param_shardings(nnx.state(module_none), mesh, rules)
    assert not caplog.records


def test_a_collate_that_loses_rows_is_refused_before_they_are_trained_on(tmp_path) -> None:
    """Every field a collate returns holds one row per example it was given: a row dropped (or added) would train
    silently on one device and misalign the example ids a resume counts on."""
    def dropping(self, rows, example_ids):
        return {key: value[:-1] for key, value in Classifier.collate(self, rows, example_ids).items()}

    with pytest.raises(DataError, match=r"collate returned 7 rows in field 'x' for 8 examples"):
        with_hook("collate", dropping)(arguments(tmp_path)).train()


@pytest.mark.parametrize("declared, said", [
    ({"teacher": nnx.Linear(2, 3, rngs=nnx.Rngs(0))}, r"configure_frozen's entry 'teacher' is a Linear, not a "
                                                      r"Frozen.*\{'teacher': Frozen\(value, checkpoint=False\)\}"),
    ({"teacher": Frozen("runs/teacher")}, r"entry 'teacher' holds the str 'runs/teacher'.*not loaded.*"
                                          r"from_pretrained\(path, mesh=self.mesh"),
    ([Frozen(np.ones(3))], r"configure_frozen returned a list.*\{name: Frozen\(\.\.\.\)\}"),
])
def test_a_configure_frozen_result_of_other_than_frozen_entries_is_named_with_the_fix(tmp_path, declared, said):
    """Before, an AttributeError ('MLP' object has no attribute 'value') or JAX's 'not a valid JAX type' from deep
    inside the placement."""
    with pytest.raises(TypeError, match=said):
        with_hook("configure_frozen", lambda self: declared)(arguments(tmp_path)).setup()


@pytest.mark.parametrize("returned, said", [(1e-3, r"a float \(0.001\).*optax.constant_schedule\(0.001\)"),
                                            (None, r"None.*return")])
def test_a_schedule_that_is_no_function_of_the_update_is_refused_at_setup(tmp_path, returned, said):
    """Before, "TypeError: 'float' object is not callable" from inside the first train step's trace."""
    with pytest.raises(TypeError, match=r"configure_schedule returned " + said):
        with_hook("configure_schedule", lambda self, total_steps: returned)(arguments(tmp_path)).setup()


@pytest.mark.parametrize("hook, returned, said", [
    ("prepare_datasets", lambda self: blobs(32, 1), r"prepare_datasets returned a dict.*\(train_rows, eval_rows\)"),
    ("prepare_datasets", lambda self: None, r"prepare_datasets returned None.*\(train_rows, eval_rows\)"),
    ("collate", lambda self, rows, example_ids: None, r"collate returned a NoneType; return a dict"),
    ("create_module", lambda self: None, r"create_module returned a NoneType; return the module it builds"),
    ("create_module", lambda self: MLP, r"create_module returned the class MLP.*an instance"),
    ("compute_metrics", lambda self, predictions, batch: None, r"compute_metrics returned a NoneType.*\{\} for none"),
    ("configure_optimizer", lambda self, schedule: None, r"configure_optimizer returned a NoneType.*optax"),
    ("task_settings", lambda self: None, r"Trainer.task_settings\(\) returned a NoneType.*\{\} for none"),
])
def test_a_hook_that_returns_the_wrong_kind_of_value_is_named_with_the_fix(tmp_path, hook, returned, said):
    """A forgotten `return` (None) or another kind of value than the hook's, named at set-up. Before, each failed
    inside easytrain: 'cannot unpack non-iterable NoneType object', prepare_datasets' train dict unpacked into its
    column names ('data source ... got str'), a StopIteration from the loader (which drops a None batch),
    "'NoneType' object has no attribute 'eval'" / 'items' / 'init', flax's 'tuple index out of range'."""
    with pytest.raises(TypeError, match=said):
        with_hook(hook, returned)(arguments(tmp_path)).setup()
