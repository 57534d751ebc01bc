"""Family configs that would train one model and export (or reload as) another are refused by name, up front.

* A Mistral config carrying `layer_types`: transformers' `MistralModel` ignores them (a window on every layer), but
  `AutoConfig.from_pretrained` reads a mistral config.json holding them as a Ministral model that honours them. So
  `layer_types` must agree with the one window Mistral applies; when they do, the export leaves them out and reads
  back as Mistral, in transformers and in easytrain alike.
* `scan_layers` with a structured attention mask (`dot_product_attention`, `splash`) needs one window for every
  layer; mixed windows are refused as arguments before any text is tokenised, not while the first step is traced.
"""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.models import ConfigError, init_model, load_pretrained, save_pretrained
from easytrain.models.families import check_buildable

import tokenising_spy
from model_configs import VOCAB, family_config

FULL, SLIDING = "full_attention", "sliding_attention"


def mistral(**fields) -> transformers.MistralConfig:
    return family_config("mistral", **fields)


# (config fields, what the refusal says about them)
DISAGREEING = {
    "first layer full": (dict(sliding_window=4, layer_types=[FULL, SLIDING]), r"\['full_attention', 'sliding"),
    "all full under a window": (dict(sliding_window=4, layer_types=[FULL, FULL]), r"sliding_window = 4"),
    "sliding without a window": (dict(sliding_window=None, layer_types=[SLIDING, SLIDING]), "sliding_window = None"),
}


@pytest.mark.parametrize("case", sorted(DISAGREEING))
def test_mistral_layer_types_that_disagree_with_its_windows_are_refused(case):
    fields, named = DISAGREEING[case]
    for build in (init_model, check_buildable):
        with pytest.raises(ConfigError, match=named) as refused:
            build(mistral(**fields))
        message = str(refused.value)
        assert "config.layer_types" in message and "Ministral" in message and "remove layer_types" in message


@pytest.mark.parametrize("fields", [dict(sliding_window=4, layer_types=[SLIDING, SLIDING]),
                                    dict(sliding_window=None, layer_types=[FULL, FULL]),
                                    dict(sliding_window=4, layer_types=None)])
def test_agreeing_layer_types_export_as_the_mistral_trained(tmp_path, fields):
    """Entries that name the window Mistral applies anyway are accepted; the export leaves them out, so
    transformers' from_pretrained builds MistralForCausalLM (not Ministral) and easytrain loads it back."""
    model = init_model(mistral(**fields), seed=0)
    save_pretrained(tmp_path, model, model.config)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "mistral" and "layer_types" not in written
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "mistral"
    ids_BT = np.random.RandomState(0).randint(1, VOCAB, (2, 12))
    np.testing.assert_array_equal(np.asarray(load_pretrained(tmp_path)(jnp.asarray(ids_BT))),
                                  np.asarray(model(jnp.asarray(ids_BT))))
    assert model.config.layer_types == fields["layer_types"]  # the caller's config is left as it was


def test_agreeing_layer_types_export_runs_the_same_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    model = init_model(mistral(sliding_window=4, layer_types=[SLIDING, SLIDING]), seed=0)
    save_pretrained(tmp_path, model, model.config)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reference).__name__ == "MistralForCausalLM"
    ids_BT = np.random.RandomState(0).randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        theirs = reference(torch.tensor(ids_BT)).logits.float().numpy()
    assert np.abs(np.asarray(model(jnp.asarray(ids_BT))) - theirs).max() <= 1e-4


tokenised = tokenising_spy.tokenised  # the spy on tokenisation, a fixture


def _checkpoint(tmp_path, tokenizer_dir, config: transformers.PretrainedConfig) -> str:
    """A model directory (config.json and tokenizer files; no weights: the refusals read none)."""
    directory = tmp_path / "model"
    shutil.copytree(tokenizer_dir, directory)
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return str(directory)


def _train(tmp_path, text_lines, **kwargs) -> None:
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, max_length=16, train_batch_size=4,
                             eval_strategy="no", save_strategy="no", save_pretrained_at_end=False,
                             report_to=["none"], **kwargs)
    BaseTrainer(args, dataset_train=datasets.Dataset.from_dict({"text": text_lines})).train()


def test_a_mistral_config_json_with_per_layer_types_is_refused_by_its_field(tmp_path, tokenizer_dir, text_lines,
                                                                           tokenised):
    """transformers reads such a config.json as 'ministral': the refusal says why, and names layer_types."""
    path = _checkpoint(tmp_path, tokenizer_dir, mistral(vocab_size=320, layer_types=[FULL, SLIDING]))
    with pytest.raises(ArgumentError, match=r"'ministral'.*model_type 'mistral'.*layer_types") as refused:
        _train(tmp_path, text_lines, model_name_or_path=path)
    assert refused.value.field == "model_name_or_path" and not tokenised


STRUCTURED = ("dot_product_attention", "splash")


@pytest.mark.parametrize("implementation", STRUCTURED)
def test_scan_with_a_structured_mask_refuses_mixed_windows_before_tokenising(tmp_path, tokenizer_dir, text_lines,
                                                                           tokenised, implementation):
    path = _checkpoint(tmp_path, tokenizer_dir, family_config("qwen2", vocab_size=320))  # windows (None, 3)
    with pytest.raises(ArgumentError, match=rf"attention_implementation='{implementation}'.*\[None, 3\]"
                                            r".*attention_implementation='xla'.*scan_layers=False") as refused:
        _train(tmp_path, text_lines, model_name_or_path=path, scan_layers=True,
               attention_implementation=implementation)
    assert refused.value.field == "scan_layers" and not tokenised
    assert not (tmp_path / "run" / "sft_data_stats.json").exists()


@pytest.mark.parametrize("implementation", STRUCTURED)
def test_adapting_a_given_model_refuses_mixed_windows_under_scan(tmp_path, implementation):
    """A model passed in (`model=`) or built by `create_module` is checked when the trainer adapts it, before
    its layers are restacked or anything is traced."""
    args = TrainingArguments(output_dir=str(tmp_path), scan_layers=True, attention_implementation=implementation)
    model = init_model(family_config("qwen2"))
    with pytest.raises(ArgumentError, match=r"scan_layers: .*\[None, 3\]") as refused:
        BaseTrainer(args).adapt_module(model)
    assert refused.value.field == "scan_layers" and not model.scan_layers


@pytest.mark.parametrize(("family", "implementation", "scan"), [
    ("mistral", "dot_product_attention", True),  # one window on every layer
    ("llama", "splash", True),  # no window anywhere
    ("qwen2", "xla", True),  # dense masks take any window
    ("qwen2", "dot_product_attention", False),  # unrolled layers each take their own
])
def test_layouts_the_masks_can_run_are_accepted(tmp_path, family, implementation, scan):
    args = TrainingArguments(output_dir=str(tmp_path), scan_layers=scan, attention_implementation=implementation)
    model = BaseTrainer(args).adapt_module(init_model(family_config(family)))
    assert model.scan_layers is scan and model.attention_implementation == implementation


@pytest.mark.parametrize("scan", [False, True])
def test_a_module_of_its_own_with_a_features_attribute_gets_its_switch_as_before(tmp_path, scan):
    """A user's module defines `scan_layers` (its own scan) and a `features` of its own meaning: the mixed-window
    check is for easytrain's models only (it read `features.windows` and failed with AttributeError, defaults too)."""
    from flax import nnx

    from easytrain.trainers.switches import apply_switches

    class OwnModel(nnx.Module):
        def __init__(self, rngs):
            self.scan_layers = False
            self.features = nnx.Linear(4, 4, rngs=rngs)  # a feature extractor, not easytrain's ArchFeatures

    module = OwnModel(nnx.Rngs(0))
    apply_switches(module, TrainingArguments(output_dir=str(tmp_path), scan_layers=scan), "cpu")
    assert module.scan_layers is scan
