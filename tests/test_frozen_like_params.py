"""A frozen entry that mirrors the trained parameters (an EMA) takes their tree from the run's own filter: the
documented EMA recipe trains under LoRA, where `state.params` holds only the adapters, and an entry declared with
`mirrors_params=True` that does not match them is refused at set-up, naming what differs."""

from pathlib import Path

import jax
import numpy as np
import pytest
from doc_snippets import python_blocks, run_block
from flax import nnx

from easytrain.frozen import Frozen, FrozenError

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_trainer.md"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The page's first block (imports, `tiny_arguments`) and its EMA block, run in a scratch directory."""
    blocks = python_blocks(DOC)
    ema = [block for block in blocks if "class EMATrainer" in block.source]
    assert len(ema) == 1
    namespace = {"__name__": "doc:custom_trainer.md"}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("ema_recipe"))
        for block in (blocks[0], ema[0]):
            run_block(block, namespace)
    return namespace


def test_the_documented_ema_trains_under_lora(recipe, tmp_path):
    trainer = recipe["EMATrainer"](recipe["tiny_arguments"](str(tmp_path / "run"), lora_rank=4))
    logs = trainer.train()
    ema, params = trainer.state.frozen["ema"], trainer.state.params
    assert jax.tree.structure(ema) == jax.tree.structure(params)
    names = {"/".join(str(key.key) for key in path) for path, _ in jax.tree_util.tree_leaves_with_path(ema)}
    assert names and all("lora" in name for name in names), "the adapters only, as state.params under LoRA"
    assert logs["ema_distance"] > 0 and "ema" in trainer.state.checkpointed().frozen


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_lora_ema_resumes_from_its_checkpoint(recipe, tmp_path, scan_layers):
    settings = dict(lora_rank=4, save_strategy="steps", save_steps=2, scan_layers=scan_layers,
                    lr_scheduler_type="constant", warmup_steps=0)  # the same rates whatever max_steps
    straight = recipe["EMATrainer"](recipe["tiny_arguments"](str(tmp_path / "straight"), max_steps=4, **settings))
    straight.train()
    recipe["EMATrainer"](recipe["tiny_arguments"](str(tmp_path / "stopped"), **settings)).train()
    resumed = recipe["EMATrainer"](recipe["tiny_arguments"](str(tmp_path / "stopped"), max_steps=4,
                                                            resume_from_checkpoint="latest", **settings))
    resumed.train()
    pairs = zip(jax.tree.leaves(resumed.state.frozen["ema"]), jax.tree.leaves(straight.state.frozen["ema"]))
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-7)


def test_the_trainable_filter_is_the_one_the_run_trains_by(recipe, tmp_path):
    plain = recipe["EMATrainer"](recipe["tiny_arguments"](str(tmp_path / "plain")))
    assert plain.trainable_filter is plain.trainable
    adapted = recipe["EMATrainer"](recipe["tiny_arguments"](str(tmp_path / "lora"), lora_rank=4))
    adapted.setup()
    module = adapted.state.model()
    paths = lambda selected: {path for path, _ in nnx.to_flat_state(selected)}  # noqa: E731
    trained = paths(nnx.state(module, adapted.trainable_filter))
    assert trained == paths(nnx.state(module, adapted.state.trainable))
    assert trained and trained != paths(nnx.state(module, adapted.trainable)), "LoRA narrows `trainable`"


def test_an_entry_that_should_mirror_the_params_but_does_not_is_refused_by_name(recipe, tmp_path):
    class FullModelEMA(recipe["EMATrainer"]):
        def configure_frozen(self):  # the whole model's parameters, while LoRA trains only the adapters
            return {"ema": Frozen(lambda: nnx.state(self.create_module(), nnx.Param), checkpoint=True,
                                  mirrors_params=True)}

    trainer = FullModelEMA(recipe["tiny_arguments"](str(tmp_path / "run"), lora_rank=4))
    with pytest.raises(FrozenError, match=r"frozen entry 'ema'.*embed_tokens.*trainable_variables"):
        trainer.setup()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_mirroring_entry_in_another_float_dtype_is_accepted(recipe, tmp_path):
    """An average kept in another precision than the parameters (a float32 EMA of bfloat16 weights) is common
    practice: only the tree and the shapes must mirror state.params."""
    class HalfEMA(recipe["EMATrainer"]):
        def configure_frozen(self):
            return {"ema": Frozen(lambda: jax.tree.map(lambda x: x.astype(np.float16),
                                                       nnx.to_pure_dict(self.trainable_variables())),
                                  mirrors_params=True)}

    trainer = HalfEMA(recipe["tiny_arguments"](str(tmp_path / "run")))
    trainer.setup()
    assert {leaf.dtype for leaf in jax.tree.leaves(trainer.state.frozen["ema"])} == {np.dtype(np.float16)}


def test_an_ema_of_an_adapter_loaded_from_a_peft_directory_mirrors_its_params(tmp_path):
    """With `lora_adapter_path`, the adapter's values need a concrete base, but `trainable_variables` only gives
    shapes: the builder runs traced, with the adapter's configuration."""
    from test_lora_trainer import RANK, lora_args, write_base

    from easytrain import lora
    from easytrain.models import from_pretrained
    from easytrain.models.peft_io import save_peft_adapter
    from easytrain.trainers.sft import SFTArguments, SFTTrainer

    class AdapterEMA(SFTTrainer):
        def configure_frozen(self):
            return {"ema": Frozen(self.trainable_variables, checkpoint=True, mirrors_params=True)}

    base = write_base(tmp_path / "base")
    model = lora.apply_lora(from_pretrained(base), lora.LoRAConfig(rank=RANK, alpha=8), rngs=nnx.Rngs(3))
    adapter = save_peft_adapter(tmp_path / "adapter", model, lora.LoRAConfig(rank=RANK, alpha=8))
    trainer = AdapterEMA(lora_args(tmp_path / "run", base, lora_rank=0, lora_dropout=0.0,  # the adapter's own
                                   lora_adapter_path=str(adapter)),
                         SFTArguments(assistant_only_loss=True))
    trainer.setup()
    assert jax.tree.structure(trainer.state.frozen["ema"]) == jax.tree.structure(trainer.state.params)


def test_trainable_variables_of_a_trainer_given_its_module_copy_that_module(tmp_path):
    """A trainer given `model=` (and no `create_module` of its own) mirrors the module it was given."""
    from easytrain import BaseTrainer
    from test_custom_module_errors import MLP, Classifier, arguments

    class GivenWithEMA(Classifier):
        create_module = BaseTrainer.create_module  # the default: there is none, the module is given

        def configure_frozen(self):
            return {"ema": Frozen(self.trainable_variables, checkpoint=True, mirrors_params=True)}

    with nnx.use_eager_sharding(False):
        given = MLP(nnx.Rngs(7))
    trainer = GivenWithEMA(arguments(tmp_path), model=given)
    trainer.setup()
    expected = nnx.to_pure_dict(nnx.state(given, nnx.Param))
    for ours, theirs in zip(jax.tree.leaves(trainer.state.frozen["ema"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
