"""Work a preference or fine-tuning trainer's set-up does once, not again: the shape-only model of a checkpoint's
config (traced through every initialiser) and DPO's precomputed reference (loaded, placed, digested and its pass
traced). Counted, not timed; the values are those of the work done again (the DPO and loading tests check them)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import easytrain.trainers.dpo_reference as dpo_reference
from easytrain.models import from_pretrained, llama
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from test_dpo_trainer import tiny_args
from test_lora_trainer import write_base


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("base") / "model")


def count_builds(monkeypatch) -> list[int]:
    """Every `LlamaForCausalLM` built from now on (shape-only ones included) appends to the returned list."""
    built, real = [], llama.LlamaForCausalLM.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(llama.LlamaForCausalLM, "__init__", counted)
    return built


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_second_load_of_one_config_builds_no_model_again(base, monkeypatch, scan_layers):
    first = from_pretrained(base, param_dtype=jnp.bfloat16, scan_layers=scan_layers)
    built = count_builds(monkeypatch)
    second = from_pretrained(base, param_dtype=jnp.bfloat16, scan_layers=scan_layers)
    assert len(built) == 0, "shape-only models built by a second load of the same config"
    assert nnx.graphdef(first) == nnx.graphdef(second)
    ours, theirs = nnx.state(first, nnx.Param), nnx.state(second, nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                 nnx.to_pure_dict(ours), nnx.to_pure_dict(theirs))
    assert first.config is not second.config, "each load keeps the config it read"
    leaf = first.embed_tokens.embedding
    leaf.value = jnp.zeros_like(leaf.value)  # one load's module changed: the other's, and a third load, are not
    assert np.asarray(second.embed_tokens.embedding.value, np.float32).any()
    assert np.asarray(from_pretrained(base, param_dtype=jnp.bfloat16, scan_layers=scan_layers)
                      .embed_tokens.embedding.value, np.float32).any()


def test_another_dtype_is_another_model(base):
    assert from_pretrained(base, dtype=jnp.bfloat16).embed_tokens.dtype == jnp.bfloat16
    assert from_pretrained(base, dtype=jnp.float32).embed_tokens.dtype == jnp.float32


def test_precomputed_reference_is_built_and_placed_once_for_both_splits(base, tmp_path, monkeypatch):
    placed, real = [], dpo_reference.place_frozen
    monkeypatch.setattr(dpo_reference, "place_frozen", lambda *a, **k: placed.append(1) or real(*a, **k))
    references, reference = [], DPOTrainer.reference
    monkeypatch.setattr(DPOTrainer, "reference", lambda self: references.append(1) or reference(self))
    trainer = DPOTrainer(tiny_args(tmp_path, model_name_or_path=str(base), max_steps=1),
                         DPOArguments(precompute_ref_log_probs=True))
    trainer.setup()
    assert trainer.reference_logps_cached == {"train": False, "validation": False}
    assert (len(references), len(placed)) == (1, 1), "reference built, placed for the train and validation pairs"


def test_a_load_lays_out_the_config_once(base, monkeypatch):
    """`hf_layout` (every tensor the config implies, from a copy of its shape-only model) is the layout both the
    checkpoint's check and the reads use: measured before, built twice per load."""
    from easytrain.models import hf_load

    laid_out, real = [], hf_load.hf_layout
    monkeypatch.setattr(hf_load, "hf_layout", lambda config: laid_out.append(1) or real(config))
    from_pretrained(base, param_dtype=jnp.bfloat16)
    assert len(laid_out) == 1
