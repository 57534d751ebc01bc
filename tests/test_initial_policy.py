"""`BaseTrainer.initial_policy()`: the module exactly as this run's policy starts, as a frozen reference of a custom
trainer. A KL of the policy to it is 0 at the first step whatever the run starts from (a model directory, `model=`,
a fresh initialisation, another run's weights, a trained adapter, stacked layers, an `adapt_module` override); a
resume rebuilds it from the same sources bit for bit, and refuses a source whose weights changed, naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import ArgumentError, BaseTrainer, TrainingArguments, lora
from easytrain.frozen import Frozen
from easytrain.losses import causal_lm_loss, model_logits
from easytrain.metrics import Mean
from easytrain.models import from_pretrained
from easytrain.models.llama import init_model
from easytrain.models.peft_io import save_peft_adapter
from easytrain.trainers.preemption import TrainingPreempted
from model_configs import tiny_config
from runs import StopAt, facts_on_eight_devices, logged
from signal_callbacks import SigtermAt
from test_lora_trainer import write_base

RANK = 4


class KLTrainer(BaseTrainer):
    """Cross-entropy plus the token KL of the policy to a frozen reference: its initial policy."""

    def configure_frozen(self):
        return {"reference": Frozen(self.initial_policy(), checkpoint=False, copy=False)}

    def compute_loss(self, model, batch, rng, train, frozen):
        output = causal_lm_loss(model, batch, rng, train, frozen)
        logps_BTV = jax.nn.log_softmax(model_logits(model, batch).astype(jnp.float32))
        reference_BTV = jax.lax.stop_gradient(jax.nn.log_softmax(
            model_logits(frozen["reference"], batch).astype(jnp.float32)))
        kl_BT = jnp.sum(jnp.exp(logps_BTV) * (logps_BTV - reference_BTV), axis=-1) * batch["loss_mask"]
        return output._replace(loss_sum=output.loss_sum + 0.1 * jnp.sum(kl_BT),
                               metrics={**output.metrics, "kl": Mean(jnp.sum(kl_BT), output.count)})


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=16, train_batch_size=4, eval_batch_size=4, max_steps=1,
                  learning_rate=1e-2, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=4,
                  lora_dropout=0.0)
    return TrainingArguments(**(values | overrides))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """An exported tiny Llama, a 2-step run on it checkpointed at step 2 (other weights than the export's) and a
    saved adapter whose values are not the identity."""
    root = tmp_path_factory.mktemp("sources")
    base = write_base(root / "base")
    BaseTrainer(arguments(root / "source", model_name_or_path=str(base), max_steps=2, save_strategy="steps",
                          save_steps=1)).train()
    model = lora.apply_lora(from_pretrained(base), lora.LoRAConfig(rank=RANK, alpha=8), rngs=nnx.Rngs(3))
    for module in lora.lora_modules(model).values():
        module.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(1), module.lora_b.shape)
    adapter = save_peft_adapter(root / "adapter", model, lora.LoRAConfig(rank=RANK, alpha=8))
    return {"base": base, "source": root / "source" / "checkpoints" / "2", "adapter": Path(adapter)}


def first_kl(output_dir: Path) -> float:
    return logged(output_dir, "kl")[1]


STARTS = {
    "model_name_or_path": lambda s: dict(model_name_or_path=str(s["base"])),
    "fresh": lambda s: {},
    "init_weights_from": lambda s: dict(model_name_or_path=str(s["base"]), init_weights_from=str(s["source"])),
    "init_weights_from_lora": lambda s: dict(model_name_or_path=str(s["base"]), init_weights_from=str(s["source"]),
                                             lora_rank=RANK),
    "lora_adapter_path": lambda s: dict(model_name_or_path=str(s["base"]), lora_adapter_path=str(s["adapter"])),
    "scan_layers": lambda s: dict(model_name_or_path=str(s["base"]), init_weights_from=str(s["source"]),
                                  scan_layers=True),
}


#: Starts whose first-step KL the stopped-run test checks, on its unbroken run.
RESUMED_STARTS = ("init_weights_from", "lora_adapter_path")


@pytest.mark.parametrize("start", [start for start in STARTS if start not in RESUMED_STARTS])
def test_the_kl_to_the_initial_policy_is_zero_at_the_first_step(sources, tmp_path, start):
    KLTrainer(arguments(tmp_path, **STARTS[start](sources))).train()
    assert first_kl(tmp_path) == 0.0


def test_a_given_module_is_its_own_initial_policy(tmp_path):
    given = init_model(tiny_config(), seed=7)
    KLTrainer(arguments(tmp_path), model=given).train()
    assert first_kl(tmp_path) == 0.0


def test_after_training_a_given_module_is_not_taken_for_the_initial_policy(tmp_path):
    """After set-up the module passed as `model=` holds the trained weights: a copy of it is not where the run
    started, so building the initial policy from it then is refused, not silently the trained policy."""
    given = init_model(tiny_config(), seed=7)
    trainer = KLTrainer(arguments(tmp_path, max_steps=2), model=given)
    trainer.train()
    with pytest.raises(ArgumentError, match=r"model=.*trained weights.*configure_frozen"):
        trainer.initial_policy()


class HalvedHeadTrainer(KLTrainer):
    """A documented `adapt_module` override: the run's policy starts from a halved output head."""

    def adapt_module(self, module):
        module = super().adapt_module(module)
        module.lm_head.kernel[...] = module.lm_head.kernel[...] * 0.5
        return module


@pytest.mark.parametrize("start", ["fresh", "lora_adapter_path"])
def test_the_initial_policy_is_built_through_an_adapt_module_override(sources, tmp_path, start):
    HalvedHeadTrainer(arguments(tmp_path, **STARTS[start](sources))).train()
    assert first_kl(tmp_path) == 0.0


@pytest.mark.parametrize("start", RESUMED_STARTS)
def test_a_stopped_run_resumes_to_the_unbroken_runs_weights(sources, tmp_path, start):
    """The unbroken run also shows this start's KL of 0 at the first step."""
    common = dict(STARTS[start](sources), max_steps=3, save_strategy="steps", save_steps=1)
    straight = KLTrainer(arguments(tmp_path / "straight", **common))
    straight.train()
    assert first_kl(tmp_path / "straight") == 0.0
    with pytest.raises(TrainingPreempted):
        KLTrainer(arguments(tmp_path / "cut", **common), callbacks=[SigtermAt(1)]).train()
    resumed = KLTrainer(arguments(tmp_path / "cut", resume_from_checkpoint="latest", **common))
    resumed.train()
    assert logged(tmp_path / "cut", "kl") == logged(tmp_path / "straight", "kl")
    for ours, theirs in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(straight.state.params),
                            strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_a_resume_refuses_an_init_weights_from_source_with_other_weights(sources, tmp_path):
    """The source run's latest checkpoint is 1 when the run starts, 2 when it resumes: other weights."""
    source = shutil.copytree(sources["source"].parent.parent, tmp_path / "source")
    shutil.rmtree(source / "checkpoints" / "2")
    common = dict(model_name_or_path=str(sources["base"]), init_weights_from=str(source), max_steps=2,
                  save_strategy="steps", save_steps=1)
    KLTrainer(arguments(tmp_path / "run", **common), callbacks=[StopAt(1)]).train()
    shutil.copytree(sources["source"], source / "checkpoints" / "2")
    with pytest.raises(ArgumentError) as error:
        KLTrainer(arguments(tmp_path / "run", resume_from_checkpoint="latest", **common)).setup()
    assert error.value.field == "init_weights_from", error.value.message
    assert f"--init_weights_from {source / 'checkpoints' / '1'}" in error.value.message


EIGHT_DEVICES = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
from test_initial_policy import KLTrainer, arguments
from runs import logged

trainer = KLTrainer(arguments(sys.argv[2], model_name_or_path=sys.argv[3], init_weights_from=sys.argv[4],
                              fsdp_size=8, train_batch_size=8, eval_batch_size=8))
reference = jax.tree_util.tree_flatten_with_path(trainer.state.frozen["reference"])[0]
policy = dict(jax.tree_util.tree_flatten_with_path(trainer.state.params)[0])
trainer.train()
print(json.dumps({"devices": trainer.mesh.size, "kl": logged(sys.argv[2], "kl")[1],
                  "specs_differ": [jax.tree_util.keystr(p) for p, leaf in reference
                                   if leaf.sharding != policy[p].sharding],
                  "sharded": sum(not leaf.sharding.is_fully_replicated for _, leaf in reference),
                  "leaves": len(reference)}))
'''


def test_on_eight_devices_it_is_sharded_as_the_policy_is(sources, tmp_path):
    """FSDP over 8 devices: each reference weight has the policy's sharding (none is whole on one device where the
    policy's is split), and the KL still starts at 0."""
    script = tmp_path / "eight.py"
    script.write_text(EIGHT_DEVICES)
    facts = facts_on_eight_devices(script, str(Path(__file__).parent), str(tmp_path / "run"), str(sources["base"]),
                                   str(sources["source"]))
    assert facts["devices"] == 8 and facts["kl"] == 0.0, facts
    assert facts["specs_differ"] == [] and facts["sharded"] > 0, facts
