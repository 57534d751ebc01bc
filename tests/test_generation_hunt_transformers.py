"""Greedy `generate` equals transformers' `generate` token for token where the families depart from the Llama of
test_generation.py: Qwen3's tied head, q/k norms and head_dim apart from hidden / heads, stopping at either of two
EOS ids with the pad equal to the first; and a Mistral window shorter than the prompt, sliding on while decoding."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import transformers

from easytrain.generation import generate, pad_prompts
from easytrain.models import load_pretrained

from model_configs import VOCAB, family_config

torch = pytest.importorskip("torch")


def torch_and_ours(config: transformers.PretrainedConfig, directory) -> tuple[object, object]:
    """A PyTorch model with every weight moved far from its initialisation (peaked logits: no near-ties for argmax
    to flip on) and the same weights loaded into easytrain through safetensors."""
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.5 * torch.randn_like(param))
    reference.generation_config.eos_token_id = reference.generation_config.bos_token_id = None
    reference.save_pretrained(directory)
    return reference, load_pretrained(directory)


def hf_generate(reference, ids_BL: np.ndarray, mask_BL: np.ndarray, new: int, eos, pad: int) -> np.ndarray:
    """transformers' new tokens, padded to ``new`` columns (it stops the batch once every row is done)."""
    with torch.no_grad():
        out = reference.generate(torch.tensor(ids_BL, dtype=torch.long), attention_mask=torch.tensor(mask_BL),
                                 max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    tokens_BN = out[:, ids_BL.shape[1]:].numpy()
    return np.pad(tokens_BN, ((0, 0), (0, new - tokens_BN.shape[1])), constant_values=pad)


def test_qwen3_tied_batch_stops_at_either_eos_with_the_pad_equal_to_eos_as_transformers(tmp_path):
    config = family_config("qwen3", use_sliding_window=False, layer_types=None, tie_word_embeddings=True)
    reference, ours = torch_and_ours(config, tmp_path)
    assert ours.lm_head is None and ours.head_dim == 24 != config.hidden_size // config.num_attention_heads
    rng = np.random.RandomState(0)
    ids_BL, mask_BL = pad_prompts([rng.randint(1, VOCAB, n).tolist() for n in (11, 3, 7, 1)], 0, side="left")
    free_BN = hf_generate(reference, ids_BL, mask_BL, 12, eos=None, pad=0)
    eos = [int(free_BN[1, 4]), int(free_BN[2, 6])]  # rows 1 and 2 stop at different ids, steps 4 and 6 at the latest
    assert eos[0] != eos[1]
    expected_BN = hf_generate(reference, ids_BL, mask_BL, 12, eos=eos, pad=eos[0])
    actual_BN = generate(ours, ids_BL, mask_BL, max_new_tokens=12, eos_token_id=eos, pad_token_id=eos[0])
    np.testing.assert_array_equal(actual_BN, expected_BN)
    stopped_at = [next((s for s in range(12) if row[s] in eos), None) for row in actual_BN.tolist()]
    assert {int(actual_BN[row, step]) for row, step in enumerate(stopped_at) if step is not None} == set(eos)
    assert None in stopped_at  # and a row ran on to max_new_tokens


def test_mistral_window_shorter_than_the_prompt_decodes_as_transformers(tmp_path):
    reference, ours = torch_and_ours(family_config("mistral", sliding_window=4), tmp_path)
    assert ours.features.windows == (4, 4)
    ids_1L = np.random.RandomState(1).randint(1, VOCAB, (1, 9))  # 9 prompt + 10 new tokens: the window slides
    mask_1L = np.ones_like(ids_1L)
    expected_1N = hf_generate(reference, ids_1L, mask_1L, 10, eos=None, pad=0)
    np.testing.assert_array_equal(generate(ours, ids_1L, mask_1L, max_new_tokens=10), expected_1N)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.3, 3, 0.9), (1.7, None, 0.5), (1.0, 10, None),
                                                       (0.7, 40, 0.99), (2.0, 1, 0.1)])
def test_the_sampling_filters_keep_the_set_transformers_warpers_keep(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, as transformers' logits warpers in `generate(do_sample=True)`, on
    logits without ties (at exact ties the two keep different subsets; docs/models.md, Sampling)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from easytrain.sampling import filter_logits, scale_logits

    rng = np.random.RandomState(0)
    logits_BV = (rng.randn(64, 50) * rng.choice([0.3, 3.0, 20.0], (64, 1))).astype(np.float32)
    scores = TemperatureLogitsWarper(temperature)(None, torch.tensor(logits_BV))
    scores = scores if top_k is None else TopKLogitsWarper(top_k)(None, scores)
    scores = scores if top_p is None else TopPLogitsWarper(top_p)(None, scores)
    kept_BV = np.isfinite(np.asarray(filter_logits(scale_logits(logits_BV, temperature), top_k, top_p)))
    np.testing.assert_array_equal(kept_BV, np.isfinite(scores.numpy()))
    assert 0 < kept_BV.sum() < kept_BV.size
