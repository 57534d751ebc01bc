"""Mistakes in a trainer of one's own are named at set-up, with the fix, instead of passing silently or failing
deep inside JAX."""

import numpy as np
import pytest

from easytrain.data.batch_checks import BatchCheck
from easytrain.data.errors import DataError

PAIR = {"chosen_ids": np.ones((2, 4), np.int32), "rejected_ids": np.ones((2, 4), np.int32)}
EXAMPLES = np.arange(2)


def test_a_declared_token_field_missing_from_the_batch_is_refused_by_name():
    check = BatchCheck(64, ("chosen_ids", "rejectd_ids"))
    with pytest.raises(DataError, match=r"'rejectd_ids'.*not in the batch.*'chosen_ids', 'rejected_ids'.*token_fields"):
        check(PAIR, EXAMPLES)


def test_a_declared_token_field_of_floats_is_refused_by_name():
    check = BatchCheck(64, ("chosen_ids", "rejected_ids"))
    with pytest.raises(DataError, match=r"'chosen_ids'.*float32.*integer"):
        check({**PAIR, "chosen_ids": PAIR["chosen_ids"].astype(np.float32)}, EXAMPLES)


def test_the_default_token_fields_may_be_absent():
    assert BatchCheck(64)({"input_ids": np.ones((2, 4), np.int32)}, EXAMPLES)  # no targets: a classifier's batch


def tiny_state():
    import optax
    from flax import nnx

    from easytrain import TrainState
    from easytrain.state import raw_key, split_model
    graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    return TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.sgd(0.1), rng=raw_key(0))


def reads(name: str, where: str):
    def loss_fn(model, batch, rng, train, frozen):
        source = batch if where == "batch" else frozen
        return source[name]
    return loss_fn


@pytest.mark.parametrize("step", ["train", "eval"])
def test_a_batch_key_the_loss_misses_is_named_with_the_fields_and_collate(step):
    import functools

    import jax

    from easytrain.steps import eval_step, train_step
    fn = (functools.partial(train_step, schedule=lambda s: 0.1) if step == "train" else eval_step)
    with pytest.raises(KeyError, match=r"'chosen_ids'.*batch's fields: 'x'.*collate") as error:
        jax.eval_shape(functools.partial(fn, loss_fn=reads("chosen_ids", "batch")), tiny_state(),
                       {"x": np.ones((2, 2), np.float32)})
    assert isinstance(error.value.__cause__, KeyError)


def test_a_frozen_name_the_loss_misses_is_named_with_configure_frozen():
    import functools

    import jax

    from easytrain.steps import train_step
    with pytest.raises(KeyError, match=r"'teachr'.*frozen entries: none.*configure_frozen"):
        jax.eval_shape(functools.partial(train_step, schedule=lambda s: 0.1, loss_fn=reads("teachr", "frozen")),
                       tiny_state(), {"x": np.ones((2, 2), np.float32)})


@pytest.mark.parametrize("given", ["batch", "frozen"])
def test_a_key_error_of_the_loss_own_for_a_name_it_was_given_is_raised_unchanged(given):
    """The loss's own dict lacks a name the batch or the frozen entries hold: its KeyError is not reworded as a name
    the loss was not given."""
    from easytrain.steps import LossKeyError, called

    def loss_fn(model, batch, rng, train, frozen):
        return {"vocab": 10}["input_ids"]

    fields = {"input_ids": np.ones(3, np.int32)}
    with pytest.raises(KeyError) as error:
        called(loss_fn, None, fields if given == "batch" else {}, None, True, fields if given == "frozen" else {})
    assert not isinstance(error.value, LossKeyError) and error.value.args == ("input_ids",)


def test_a_key_in_neither_the_batch_nor_the_frozen_entries_is_reworded():
    from easytrain.steps import LossKeyError, called

    def loss_fn(model, batch, rng, train, frozen):
        return {"vocab": 10}["labels"]

    with pytest.raises(LossKeyError, match=r"compute_loss read 'labels', which it was not given: the batch's "
                                           r"fields: 'input_ids'"):
        called(loss_fn, None, {"input_ids": np.ones(3, np.int32)}, None, True, {})


def pair_rows(count: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(count).integers(0, 64, (count, 8)).astype(np.int32)
    return {"chosen_ids": ids, "rejected_ids": ids[::-1].copy()}


def reward_trainer(tmp_path, **overrides):
    """A reward model (a Llama backbone and a scalar head) whose model_config is set but whose default
    save_pretrained cannot export it."""
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    from easytrain import BaseTrainer, LossOutput, TrainingArguments
    from easytrain.models import LlamaForCausalLM
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)

    class RewardModel(nnx.Module):
        def __init__(self, rngs):
            self.backbone = LlamaForCausalLM(config, rngs=rngs)
            self.head = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, ids):
            return self.head(self.backbone.hidden_states(ids).reshape(ids.shape[0], ids.shape[1], -1)[:, -1])[:, 0]

    class RewardTrainer(BaseTrainer):
        token_fields = ("chosen_ids", "rejected_ids")

        def prepare_datasets(self):
            self.model_config = config
            return pair_rows(16), None

        def collate(self, rows, example_ids):
            return {"chosen_ids": np.asarray(rows["chosen_ids"]), "rejected_ids": np.asarray(rows["rejected_ids"])}

        def create_module(self):
            return RewardModel(nnx.Rngs(0))

        def compute_loss(self, model, batch, rng, train, frozen):
            margin = model(batch["chosen_ids"]) - model(batch["rejected_ids"])
            return LossOutput(-jnp.sum(jax.nn.log_sigmoid(margin)), jnp.float32(margin.shape[0]), {})

    import jax
    args = dict(output_dir=str(tmp_path), report_to=["none"], disable_progress_bar=True, train_batch_size=4,
                max_steps=1, save_strategy="no", max_length=8)
    return RewardTrainer(TrainingArguments(**{**args, **overrides}))


def test_a_module_the_default_export_cannot_write_is_refused_at_setup(tmp_path):
    from easytrain.errors import ArgumentError
    refused = r"save_pretrained_at_end.*RewardModel.*unexpected.*backbone/.*override save_pretrained"
    with pytest.raises(ArgumentError, match=refused):
        reward_trainer(tmp_path).setup()
    reward_trainer(tmp_path, save_pretrained_at_end=False).setup()  # no export asked: nothing to refuse


class Unannotated:
    """A module whose parameters carry no logical axes, so no rule shards them."""

    @staticmethod
    def abstract_params(annotated: bool):
        from flax import nnx
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")) if annotated \
            else nnx.initializers.lecun_normal()
        with nnx.use_eager_sharding(False):
            module = nnx.eval_shape(lambda: nnx.Linear(8, 8, kernel_init=init, rngs=nnx.Rngs(0)))
        return nnx.state(module, nnx.Param)


def test_a_mesh_axis_no_parameter_is_sharded_over_is_warned_once_with_the_fix(caplog, monkeypatch):
    from jax.sharding import AbstractMesh

    from easytrain import sharding
    monkeypatch.setattr(sharding, "_WARNED_MESH_AXES", set(), raising=False)
    mesh = AbstractMesh((1, 4, 1), sharding.MESH_AXES)
    with caplog.at_level("WARNING", logger="easytrain"):
        sharding.param_shardings(Unannotated.abstract_params(annotated=True), mesh)
        assert not caplog.records  # 'embed' -> fsdp: sharded
        sharding.param_shardings(Unannotated.abstract_params(annotated=False), mesh)
        sharding.param_shardings(Unannotated.abstract_params(annotated=False), mesh)
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 1, warned
    assert "fsdp_size=4" in warned[0] and "'embed'" in warned[0] and "with_partitioning" in warned[0], warned[0]
