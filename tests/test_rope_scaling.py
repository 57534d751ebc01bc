"""Scaled RoPE (`rope_parameters['rope_type']` llama3, linear, yarn) as transformers computes it: the inverse
frequencies and YaRN's attention factor against transformers' own functions, and the logits and greedy decoding of
checkpoints with each scaling against the PyTorch model on the same weights. Types whose frequencies follow the
sequence seen at run time stay refused by name."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import transformers
from flax import nnx

from easytrain.generation import generate, pad_prompts
from easytrain.models import load_pretrained, save_pretrained
from easytrain.models.families import ConfigError, UnsupportedConfigError, rope_scaling
from easytrain.models.llama import init_model

from model_configs import VOCAB, family_config, forward, reference_logits, right_padded_batch, tiny_config
from test_generation_hunt_transformers import torch_and_ours

torch = pytest.importorskip("torch")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402 (needs torch)

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# (family, rope_parameters): each scaling moves most of a head's frequencies at the tiny head widths here
CASES = {
    "llama3": ("llama", LLAMA3),
    "linear": ("mistral", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn": ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": 16}),
    "yarn mscale": ("qwen3", {"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0, "mscale": 1.0,
                              "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False,
                              "original_max_position_embeddings": 32}),
}


def config_of(case: str, **fields) -> transformers.PretrainedConfig:
    family, rope = CASES[case]
    return family_config(family, rope_parameters=dict(rope), max_position_embeddings=256, **fields)


@pytest.mark.parametrize("case", [*CASES, "yarn without factor", "yarn attention_factor", "yarn truncate null"])
def test_inverse_frequencies_and_attention_factor_are_transformers(case):
    if case == "yarn without factor":  # the factor follows from the context lengths
        config = config_of("yarn")
        config.rope_parameters["factor"] = None
    elif case == "yarn truncate null":  # transformers reads `"truncate": null` as false (`if truncate:`)
        config = config_of("yarn mscale")
        config.rope_parameters["truncate"] = None
    elif case == "yarn attention_factor":
        config = config_of("yarn")
        config.rope_parameters["attention_factor"] = 0.75
    else:
        config = config_of(case)
    expected, expected_factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu")
    scaling = rope_scaling(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ours = scaling.inverse_frequencies(head_dim, config.rope_parameters["rope_theta"])
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    assert scaling.attention_factor == pytest.approx(expected_factor, rel=1e-6)
    unscaled = 1.0 / config.rope_parameters["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    assert np.abs(ours / unscaled - 1).max() > 0.5  # the case scales: the default RoPE would fail this test


@pytest.mark.parametrize("case", CASES)
def test_logits_of_a_scaled_checkpoint_are_transformers(tmp_path, case):
    config = config_of(case)
    reference, ours = torch_and_ours(config, tmp_path / "scaled")
    ids_BT, mask_BT = right_padded_batch(lengths=(40, 23))
    expected = reference_logits(reference, ids_BT, mask_BT)
    actual = np.asarray(forward(ours, ids_BT, mask_BT))
    real = mask_BT.astype(bool)
    np.testing.assert_allclose(actual[real], expected[real], rtol=1e-4, atol=2e-4)
    shutil.copytree(tmp_path / "scaled", tmp_path / "unscaled")
    fields = json.loads((tmp_path / "unscaled" / "config.json").read_text())
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields["rope_parameters"]["rope_theta"]}
    (tmp_path / "unscaled" / "config.json").write_text(json.dumps(fields))
    unscaled = load_pretrained(tmp_path / "unscaled")  # the same weights without the scaling: far from transformers
    assert np.abs(np.asarray(forward(unscaled, ids_BT, mask_BT))[real] - expected[real]).max() > 1e-2


def test_greedy_decoding_of_a_llama3_checkpoint_is_transformers(tmp_path):
    """The cached decode builds its tables from the same scaled frequencies as the full forward."""
    reference, ours = torch_and_ours(config_of("llama3"), tmp_path)
    rng = np.random.RandomState(1)
    ids_BL, mask_BL = pad_prompts([rng.randint(1, VOCAB, n).tolist() for n in (30, 9)], 0, side="left")
    with torch.no_grad():
        out = reference.generate(torch.tensor(ids_BL, dtype=torch.long), attention_mask=torch.tensor(mask_BL),
                                 max_new_tokens=10, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(generate(ours, ids_BL, mask_BL, max_new_tokens=10, pad_token_id=0),
                                  out[:, ids_BL.shape[1]:].numpy())
    assert hash(nnx.split(ours)[0]) == hash(nnx.split(load_pretrained(tmp_path))[0])  # a static attribute: jit caches
    save_pretrained(tmp_path / "export", ours, ours.config)
    exported = transformers.AutoConfig.from_pretrained(tmp_path / "export").rope_parameters
    assert exported == reference.config.rope_parameters and exported["rope_type"] == "llama3"


@pytest.mark.parametrize("rope, error, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, UnsupportedConfigError, r"rope_type'\] = 'dynamic'.*'llama3'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, ConfigError,
     r"lacks high_freq_factor, original_max_position_embeddings"),
    (LLAMA3 | {"low_freq_factor": 4.0}, ConfigError, r"high_freq_factor \(4.0\) must exceed low_freq_factor"),
    # transformers rotates only part of each head here and its attention then fails on the shapes
    (LLAMA3 | {"partial_rotary_factor": 0.5}, UnsupportedConfigError, r"partial_rotary_factor'\] = 0.5"),
    # a hand-edited config.json: strings where numbers belong, past transformers' own checks (it only warns)
    (CASES["yarn"][1] | {"attention_factor": "0.5"}, ConfigError, r"\['attention_factor'\] = '0.5' must be a number"),
    (CASES["yarn"][1] | {"mscale": "1", "mscale_all_dim": 1.0}, ConfigError, r"\['mscale'\] = '1' must be a number"),
    (CASES["yarn"][1] | {"truncate": "false"}, ConfigError, r"\['truncate'\] = 'false' must be true or false"),
    (LLAMA3 | {"low_freq_factor": "1.0"}, ConfigError, r"\['low_freq_factor'\] = '1.0' must be a number"),
])
def test_a_scaling_easytrain_cannot_compute_is_refused_by_name(rope, error, match):
    config = tiny_config()
    config.rope_parameters = {"rope_theta": 10000.0} | rope  # past transformers' own validation, as a config.json
    with pytest.raises(error, match=match):
        init_model(config)


def test_a_full_partial_rotary_factor_is_the_plain_scaling():
    """1.0 rotates the whole head, as transformers does; only a fraction of it is refused."""
    full, plain = tiny_config(), tiny_config()
    full.rope_parameters, plain.rope_parameters = LLAMA3 | {"partial_rotary_factor": 1.0}, dict(LLAMA3)
    assert rope_scaling(full) == rope_scaling(plain) is not None


def test_a_resume_compares_the_context_length_a_yarn_factor_is_derived_from():
    """Without a factor, YaRN's follows from max_position_embeddings, which otherwise decides nothing computed: a
    resume whose config changed it would have trained with other frequencies without a word."""
    from easytrain.trainers.resume_checks import architecture_differences

    stored = config_of("yarn").to_dict()
    stored["rope_parameters"]["factor"] = None
    assert architecture_differences(stored, stored | {"max_position_embeddings": 512}) == [
        "max_position_embeddings: checkpoint 256 vs now 512"]
    given = config_of("yarn").to_dict()  # with a factor of its own, the context length decides nothing
    assert architecture_differences(given, given | {"max_position_embeddings": 512}) == []


@pytest.mark.parametrize("case", [*CASES, "yarn without factor"])
def test_the_scaling_holds_max_position_embeddings_only_where_it_reads_it(case):
    """The scaling is a static attribute of the model: two configs differing only in a context length their
    frequencies never read give equal scalings (they held it for every type); YaRN without a factor derives it from
    that length, so there the two differ."""
    configs = [config_of(case.removesuffix(" without factor")) for _ in range(2)]
    configs[1].max_position_embeddings = 512
    if case == "yarn without factor":
        for config in configs:
            config.rope_parameters["factor"] = None
    first, second = (rope_scaling(config) for config in configs)
    assert (first == second) is (case != "yarn without factor")
