"""LoRA on a custom module: `lora_rank` adapts easytrain's `Dense` layers only, so a module of flax `nnx.Linear`
layers is told so (with the `nnx.LoRALinear` route, which trains), and its layers' names carry the `model.` prefix
that regular expressions over them must match."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import ArgumentError, BaseTrainer, LossOutput, TrainingArguments
from easytrain.models.layers import Dense


def circle_points(count: int, seed: int) -> dict[str, np.ndarray]:
    points = np.random.default_rng(seed).uniform(-1.5, 1.5, (count, 2)).astype(np.float32)
    return {"x": points, "label": (np.linalg.norm(points, axis=1) < 1).astype(np.int32)}


class LinearMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden, self.out = nnx.Linear(2, 16, rngs=rngs), nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


class LoRALinearMLP(nnx.Module):
    """Flax's own LoRA layers: what docs/lora.md points a custom module of nnx.Linear layers to."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.LoRALinear(2, 16, lora_rank=2, rngs=rngs)
        self.out = nnx.LoRALinear(16, 2, lora_rank=2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


class DenseMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        dense = dict(use_bias=True, std=0.5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.hidden = Dense(2, 16, axes=("embed", "mlp"), **dense)
        self.out = Dense(16, 2, axes=("mlp", "embed"), **dense)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def trainer_class(module: type, trainable: nnx.filterlib.Filter = nnx.Param) -> type[BaseTrainer]:
    class CircleTrainer(BaseTrainer):
        reads_given_data = False

        def prepare_datasets(self):
            return circle_points(64, 0), None

        def collate(self, rows, example_ids):
            return {"x": rows["x"], "label": rows["label"], "weight": (example_ids >= 0).astype(np.float32),
                    "example_id": example_ids}

        def create_module(self):
            return module(nnx.Rngs(self.arguments.seed))

        def compute_loss(self, model, batch, rng, train, frozen):
            logps = jax.nn.log_softmax(model(batch["x"]))
            nll = -jnp.take_along_axis(logps, batch["label"][:, None], -1)[:, 0]
            return LossOutput(jnp.sum(nll * batch["weight"]), jnp.sum(batch["weight"]), {})

    CircleTrainer.trainable = trainable
    return CircleTrainer


def arguments(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), train_batch_size=8, max_steps=2, logging_steps=1,
                  eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                  save_pretrained_at_end=False, learning_rate=1e-2)
    return TrainingArguments(**{**values, **overrides})


def test_lora_rank_on_nnx_linear_layers_points_to_dense_and_lora_linear(tmp_path):
    with pytest.raises(ArgumentError) as error:
        trainer_class(LinearMLP)(arguments(tmp_path, lora_rank=2)).setup()
    message = error.value.message
    assert error.value.field == "lora_target_modules"
    assert "easytrain.models.layers.Dense" in message and "nnx.LoRALinear" in message and "docs/lora.md" in message
    assert "'model.hidden'" in message and "named []" not in message


def test_the_lora_linear_route_trains_only_the_adapters(tmp_path):
    trainer = trainer_class(LoRALinearMLP, nnx.LoRAParam)(arguments(tmp_path))
    trainer.setup()
    before = jax.tree.map(np.asarray, trainer.state.model_state)
    trained = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(trainer.state.params)}
    assert trained and all("lora_" in name for name in trained)
    initial = jax.tree.map(np.asarray, trainer.state.params)
    trainer.train()
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, trainer.state.model_state))
    assert any(np.abs(a - np.asarray(b)).max() > 0 for a, b in zip(jax.tree.leaves(initial),
                                                                    jax.tree.leaves(trainer.state.params)))


@pytest.mark.parametrize("targets", [["hidden", "out"], ["re:model\\.(hidden|out)"], "model\\.(hidden|out)",
                                     "re:model\\.(hidden|out)"])
def test_dense_layers_of_a_custom_module_take_adapters_by_their_model_prefixed_names(tmp_path, targets):
    trainer = trainer_class(DenseMLP)(arguments(tmp_path, lora_rank=2, lora_target_modules=targets))
    trainer.setup()
    assert {name: set(layer) for name, layer in trainer.state.params.items()} == {
        "hidden": {"lora_a", "lora_b"}, "out": {"lora_a", "lora_b"}}
    with pytest.raises(ArgumentError, match=r"must match a whole name such as 'model\.hidden'"):
        trainer_class(DenseMLP)(arguments(tmp_path, lora_rank=2, lora_target_modules="hidden|out")).setup()
