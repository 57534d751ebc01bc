"""Config fields that change transformers' training forward are implemented or refused by name, never ignored."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from easytrain.models import UnsupportedConfigError, init_model, load_pretrained
from easytrain.models.families import features_of

torch = pytest.importorskip("torch")

from model_configs import family_config  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_dropout_is_refused_with_the_fix(family):
    with pytest.raises(UnsupportedConfigError, match=r"attention_dropout = 0\.1.*Set it to 0\.0") as error:
        features_of(family_config(family, attention_dropout=0.1))
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("value", [0.0, 0])
def test_zero_or_unset_attention_dropout_still_loads(family, value):
    assert init_model(family_config(family, attention_dropout=value)) is not None


def test_saved_checkpoint_with_attention_dropout_is_refused_on_load(tmp_path):
    import transformers

    config = family_config("llama", attention_dropout=0.5)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedConfigError, match="attention_dropout"):
        load_pretrained(tmp_path)


# Every config field the families' transformers modeling code reads, and how easytrain treats it: a field
# transformers starts reading (a new release) fails this test until it is implemented or refused.
HANDLED_FIELDS = {
    "_attn_implementation": "kernel choice only",
    "attention_bias": "ArchFeatures.qkv_bias / o_bias",
    "attention_dropout": "refused unless 0",
    "hidden_act": "families.activation_name (unknown values refused)",
    "hidden_size": "model width",
    "intermediate_size": "MLP width",
    "layer_types": "ArchFeatures.windows",
    "max_position_embeddings": "YaRN's factor where rope_parameters gives none; else transformers' cache length only",
    "mlp_bias": "ArchFeatures.mlp_bias",
    "num_attention_heads": "heads",
    "num_hidden_layers": "layers",
    "num_key_value_heads": "grouped-query heads",
    "pad_token_id": "embedding padding_idx: only zeroes that row's gradient in PyTorch",
    "rms_norm_eps": "norm epsilon",
    "rope_parameters": "families.rope_theta, rope_scaling (llama3, linear, yarn; dynamic, longrope refused)",
    "sliding_window": "ArchFeatures.windows",
    "vocab_size": "vocabulary",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_config_field_transformers_reads_is_handled(family):
    import importlib
    import inspect
    import re

    source = inspect.getsource(importlib.import_module(f"transformers.models.{family}.modeling_{family}"))
    read = set(re.findall(r"\bconfig\.(\w+)", source)) - {"get_text_config", "use_return_dict"}
    unreviewed = sorted(read - set(HANDLED_FIELDS))
    assert not unreviewed, f"transformers' {family} reads {unreviewed}: implement or refuse them in families.py"
