"""config.json as checkpoints on the Hub still write it (transformers v4 keys) loads as transformers reads it: a
top-level rope_theta with rope_scaling null, Qwen2.5's sliding_window set but switched off by use_sliding_window,
and a v4 rope_scaling of another RoPE type refused by name."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import transformers

from easytrain.models import load_pretrained
from easytrain.models.families import UnsupportedConfigError

from model_configs import family_config, forward, reference_logits, right_padded_batch, tiny_config

torch = pytest.importorskip("torch")


def rewritten_checkpoint(config: transformers.PretrainedConfig, directory, edit) -> object:
    """A random PyTorch model saved to ``directory``, its config.json then rewritten by ``edit(fields)``; returns
    transformers' model read back from the rewritten files."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(directory)
    path = directory / "config.json"
    fields = json.loads(path.read_text())
    edit(fields)
    path.write_text(json.dumps(fields))
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def v4_rope(theta: float, scaling: dict | None):
    def edit(fields: dict) -> None:
        del fields["rope_parameters"]
        fields.update(rope_theta=theta, rope_scaling=scaling)
    return edit


def assert_same_logits(reference, ours) -> None:
    ids_BT, mask_BT = right_padded_batch(lengths=(12, 7))
    expected = reference_logits(reference, ids_BT, mask_BT)
    actual = np.asarray(forward(ours, ids_BT, mask_BT))
    real = mask_BT.astype(bool)
    np.testing.assert_allclose(actual[real], expected[real], atol=1e-4)


def test_a_top_level_rope_theta_with_rope_scaling_null_is_read(tmp_path):
    reference = rewritten_checkpoint(tiny_config(), tmp_path, v4_rope(5e5, None))
    ours = load_pretrained(tmp_path)
    assert ours.rope_theta == 5e5
    assert_same_logits(reference, ours)


def test_qwen2_sliding_window_switched_off_by_use_sliding_window_is_full_attention(tmp_path):
    def qwen25(fields: dict) -> None:  # Qwen2.5's config.json: a window is named, but no layer uses it
        fields.pop("layer_types", None)
        fields.update(use_sliding_window=False, sliding_window=4, max_window_layers=1)

    reference = rewritten_checkpoint(family_config("qwen2", use_sliding_window=False), tmp_path, qwen25)
    ours = load_pretrained(tmp_path)
    assert ours.features.windows == (None, None)
    assert_same_logits(reference, ours)  # 12 tokens: a window of 4 on layer 1 would change them


def test_a_v4_linear_rope_scaling_loads_as_transformers_reads_it(tmp_path):
    reference = rewritten_checkpoint(tiny_config(), tmp_path, v4_rope(1e4, {"type": "linear", "factor": 4.0}))
    ours = load_pretrained(tmp_path)
    assert (ours.rope_scaling.rope_type, ours.rope_scaling.value("factor")) == ("linear", 4.0)
    assert_same_logits(reference, ours)


@pytest.mark.parametrize("scaling", [{"type": "dynamic", "factor": 2.0}, {"type": "longrope", "factor": 2.0,
                                     "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}])
def test_a_v4_rope_scaling_of_another_type_is_refused_naming_it(tmp_path, scaling):
    rewritten_checkpoint(tiny_config(), tmp_path, v4_rope(1e4, scaling))
    with pytest.raises(UnsupportedConfigError, match=f"rope_type'\\] = '{scaling['type']}'"):
        load_pretrained(tmp_path)
